"""Quality in the miniature world: a membrane trained with the pack's Train SPM code on the shipped
model erases its concept and leaves the rest alone, as the classifier reads 32 generations per
prompt at fixed seeds. The thresholds are the issue's (erase >= 80% of target generations, lose
<= 5 points of accuracy on other prompts); the zero-membrane test shows the measurement fails
when nothing is erased."""

from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch

from miniworld.evaluate import erasure, generate_and_read, preservation
from miniworld.lab import Lab
from miniworld.world import Request

COUNT = 32
TARGET = "snowman"
TARGET_PROMPTS = [Request("a snowman", ("snowman",)), Request("a striped snowman", ("snowman", "striped"))]
OTHER_PROMPTS = [Request("a red circle", ("circle", "red")), Request("a green square", ("square", "green")),
                 Request("a blue triangle", ("triangle", "blue")), Request("a yellow cross", ("cross", "yellow")),
                 Request("a house", ("house",)), Request("a tree", ("tree",)), Request("a mushroom", ("mushroom",)),
                 Request("a striped purple circle", ("circle", "purple", "striped"))]
PROMPTS = TARGET_PROMPTS + OTHER_PROMPTS


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with torch.inference_mode(False):
        return Lab(membrane_dir=str(tmp_path_factory.mktemp("miniworld_spm")))


@pytest.fixture(scope="module")
def bare_readings(lab):
    return generate_and_read(lab, lab.model, PROMPTS, COUNT)


def test_the_bare_model_draws_the_target(bare_readings):
    assert erasure(bare_readings, TARGET_PROMPTS, TARGET) <= 0.1, "the shipped model no longer draws snowmen"


def test_trained_membrane_erases_the_target_and_spares_the_rest(lab, bare_readings):
    membrane = lab.train_membrane("snowman_quality", [TARGET])
    readings = generate_and_read(lab, lab.apply(lab.model, membrane, transport="paper"), PROMPTS, COUNT)
    erased = erasure(readings, TARGET_PROMPTS, TARGET)
    drop = preservation(bare_readings, PROMPTS, [TARGET]) - preservation(readings, PROMPTS, [TARGET])
    print(f"\nsnowman membrane: erased {erased:.1%} of target generations (bare {erasure(bare_readings, TARGET_PROMPTS, TARGET):.1%}); "
          f"accuracy on other prompts {preservation(readings, PROMPTS, [TARGET]):.1%} "
          f"(bare {preservation(bare_readings, PROMPTS, [TARGET]):.1%})")
    assert erased >= 0.8
    assert drop <= 0.05


def test_a_membrane_of_zeros_fails_the_erasure_check(lab, bare_readings):
    trained = os.path.join(lab.membrane_dir, "snowman_quality.safetensors")
    if not os.path.exists(trained):
        lab.train_membrane("snowman_quality", [TARGET])
    tensors = safetensors.torch.load_file(trained)
    with safetensors.safe_open(trained, "pt") as handle:
        metadata = handle.metadata()
    zeros = {k: (v if k.endswith(".alpha") else torch.zeros_like(v)) for k, v in tensors.items()}
    safetensors.torch.save_file(zeros, os.path.join(lab.membrane_dir, "snowman_zeros.safetensors"), metadata=metadata)
    readings = generate_and_read(lab, lab.apply(lab.model, "snowman_zeros.safetensors", transport="paper"),
                                 TARGET_PROMPTS, COUNT)
    assert erasure(readings, TARGET_PROMPTS, TARGET) < 0.8
