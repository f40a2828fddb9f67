"""Every choice a user picks by name is described once, beside its member (spm_core.choice.Choice),
and that description is what the node's tooltip and its help page say."""

from __future__ import annotations

import pathlib

import pytest
from pack import pack_module

HELP_PAGES = pathlib.Path(__file__).resolve().parent.parent / "web" / "docs"
LOADER_CHOICES = {"transport": "spm_core.transport.TransportMode", "rows": "nodes.gating.Rows",
                  "ramp": "spm_core.ramp.Ramp"}


def choice_class(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(pack_module(module), name)


def loader_inputs() -> dict:
    import nodes

    schema = nodes.NODE_CLASS_MAPPINGS["SPMLoader"].define_schema()
    return {item.id: item for item in schema.inputs}


@pytest.mark.parametrize("input_name", list(LOADER_CHOICES))
def test_loader_choices_are_described_alike_in_tooltip_and_help_page(input_name):
    choices = choice_class(LOADER_CHOICES[input_name])
    widget = loader_inputs()[input_name]
    assert widget.options == [member.value for member in choices]
    page = (HELP_PAGES / "SPMLoader.md").read_text(encoding="utf-8")
    for member in choices:
        assert member.description, f"{member} has no description"
        assert f"{member.value}: {member.description}" in widget.tooltip
        assert f"- `{member.value}`: {member.description}." in page, f"web/docs/SPMLoader.md does not describe {member}"


TRAIN_NODE_ONLY = {"model", "clip", "target", "surrogate", "neutral", "name", "resume", "overwrite"}


def test_train_settings_are_described_once_for_tooltip_help_page_and_command_line():
    """Every SPM Train Membrane setting's tooltip is its TrainingConfig field's description, which the help
    page and scripts/train_spm.py --help repeat word for word."""
    import dataclasses

    import nodes
    from scripts.train_spm import config_keys

    config = pack_module("spm_core.training").TrainingConfig
    described = {field.metadata["help"]: field.name for field in dataclasses.fields(config)}
    schema = nodes.NODE_CLASS_MAPPINGS["SPMTrain"].define_schema()
    page = (HELP_PAGES / "SPMTrain.md").read_text(encoding="utf-8")
    command_line = config_keys()
    settings = [item for item in schema.inputs if item.id not in TRAIN_NODE_ONLY]
    assert len(settings) >= 17
    for item in settings:
        assert item.tooltip in described, f"{item.id}'s tooltip is written by hand, not TrainingConfig's"
        assert f"- **{item.id}**: {item.tooltip}\n" in page, f"web/docs/SPMTrain.md does not describe {item.id}"
        assert f"{described[item.tooltip]} (default" in command_line and item.tooltip in command_line
