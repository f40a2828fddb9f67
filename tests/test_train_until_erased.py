"""Train until erased: the erasure level (spm_core.erasure, no classifier) measured during training,
reported, shown by SPM Train Membrane and used to stop when it reaches a set level."""

import math

import pytest
import torch
from pack import node, pack_module
from test_training import train
from tiny_models import build_clip, build_patcher


@pytest.fixture(scope="module")
def tiny(spm_world):
    return build_patcher("sd1", seed=0, prompt_gain=16), build_clip("sd1", seed=1)


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    """40 iterations with the level measured every 5: the curve the stopping tests read."""
    patcher, clip = tiny
    path = tmp_path_factory.mktemp("erasure") / "full.safetensors"
    membrane, reports, _ = train(patcher, clip, path, iterations=40, erasure_every=5, learning_rate=1e-3)
    return membrane, reports


def levels(reports):
    return [(r.iteration + 1, r.erasure) for r in reports if r.erasure is not None]


def test_the_level_is_measured_on_schedule_and_rises_as_the_membrane_learns(full_run):
    membrane, reports = full_run
    measured = levels(reports)
    assert [done for done, _ in measured] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert measured[0][1] < 0.5 * measured[-1][1], measured
    assert membrane.metadata["training"]["erasure_level"] == pytest.approx(measured[-1][1], abs=1e-4)


def test_training_stops_at_the_first_measurement_that_reaches_the_level(tiny, full_run, tmp_path):
    """Same seed, same draws: the stopped run follows the full run's curve and ends at the first
    measurement at or above the level, keeping that iteration count in the file."""
    patcher, clip = tiny
    curve = levels(full_run[1])
    goal = (curve[2][1] + curve[-1][1]) / 2
    first = next(done for done, level in curve if level >= goal)
    assert first < 40, f"pick a level the full run reaches before its end: {curve}"
    membrane, reports, _ = train(patcher, clip, tmp_path / "stopped.safetensors", iterations=40, erasure_every=5,
                                 stop_at_erasure=goal, learning_rate=1e-3)
    assert len(reports) == first
    assert reports[-1].erasure >= goal
    assert membrane.metadata["training"]["completed_iterations"] == first


def test_an_unreachable_level_runs_every_iteration_as_the_cap(tiny, tmp_path):
    patcher, clip = tiny
    membrane, reports, _ = train(patcher, clip, tmp_path / "capped.safetensors", iterations=6, erasure_every=3,
                                 stop_at_erasure=9.5)
    assert len(reports) == 6 and membrane.metadata["training"]["completed_iterations"] == 6


@pytest.mark.parametrize("overrides, message", [
    ({"stop_at_erasure": math.nan}, "stop at erasure nan is outside 0..10"),
    ({"stop_at_erasure": -0.5}, "stop at erasure -0.5 is outside 0..10"),
    ({"erasure_every": 0}, "erasure interval must be at least 1"),
])
def test_bad_stopping_settings_are_refused_by_name_and_nothing_is_written(tiny, tmp_path, overrides, message):
    patcher, clip = tiny
    with pytest.raises(pack_module("spm_core.errors").SPMError, match=message):
        train(patcher, clip, tmp_path / "bad.safetensors", **overrides)
    assert list(tmp_path.iterdir()) == []


def test_the_node_shows_the_level_and_what_robustness_cost(tiny, spm_world):
    """SPM Train Membrane with the new inputs; a call without them (a workflow saved before they
    existed) still trains with the old behaviour."""
    patcher, clip = tiny
    common = dict(model=patcher, clip=clip, target="snoopy", surrogate="", neutral="", iterations=4, learning_rate=2e-2,
                  rank=1, alpha=1.0, anchor_strength=3.0, anchor_samples=1, surrogate_sampler="prompts",
                  erase_guidance=1.0, rollout_steps=4, latent_size=8, seed=0, resume=False, overwrite=True)
    with torch.inference_mode(False):
        output = node("SPMTrain").execute(name="node_robust", stop_at_erasure=9.0, adversaries=2, adversary_tokens=2,
                                          adversary_every=2, adversary_steps=2, **common)
        old = node("SPMTrain").execute(name="node_old", **common)
    text = output.ui["text"][0]
    assert "after 4 iterations" in text and "erasure level" in text and "(not reached: stop at 9)" in text
    assert "adversarial prompt search" in text
    training = pack_module("spm_core.file_format").load_membrane(output.result[2]).metadata["training"]
    assert (training["adversaries"], training["adversary_tokens"], training["stop_at_erasure"]) == (2, 2, 9.0)
    old_training = pack_module("spm_core.file_format").load_membrane(old.result[2]).metadata["training"]
    assert (old_training["adversaries"], old_training["stop_at_erasure"]) == (0, 0.0)
    assert "adversarial" not in old.ui["text"][0]
    assert output.result[1].shape == (1, 256, 512, 3)
