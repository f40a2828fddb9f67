"""The erasure benchmark's reduced run (`scripts/erasure_benchmark.py --quick`) as a test: a
snowman membrane trained with the pack's SPM Train Membrane code on the shipped miniature model, sampled
through SPM Load Membrane with each main transport and the official code's behaviour, 32 generations per
prompt read by the classifier. The thresholds are the project's targets (DESIGN.md, issue 8:
erase >= 95% of target generations, accuracy on other prompts within 2 points of the bare
model); the control shows the same measurement fails for a membrane that erases nothing."""

from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch

from miniworld.benchmark import Evaluator, measure, panel
from miniworld.lab import Lab
from miniworld.setups import Chain
from scripts.erasure_benchmark import OTHERS, TARGETS, erasure_experiments

COUNT = 32


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with torch.inference_mode(False):
        return Lab(membrane_dir=str(tmp_path_factory.mktemp("benchmark_membranes")))


@pytest.fixture(scope="module")
def quick(lab):
    return erasure_experiments(lab, quick=True, count=COUNT)


def summary(quick, setup):
    return quick["singles_summary"][setup]


@pytest.mark.parametrize("setup", ["paper gate", "latent gate"])
def test_our_gates_erase_the_concept_and_keep_the_rest(quick, setup):
    row = summary(quick, setup)
    assert row["erased"] >= 0.95
    assert row["accuracy"] >= row["bare_accuracy"] - 0.02


def test_facilitated_transport_leaves_other_prompts_closer_to_the_bare_model_than_an_open_membrane(quick):
    always_open = summary(quick, "always open (LoRA loader)")
    assert summary(quick, "latent gate")["drift"] < always_open["drift"]
    assert summary(quick, "paper gate")["drift"] < always_open["drift"]


def test_the_gradient_attack_optimises_against_the_membrane(quick):
    for attack in quick["attacks"]:
        assert attack["loss_last"] < attack["loss_first"], attack


def test_a_membrane_of_zeros_fails_the_erasure_check(lab, quick):
    trained = next(f for f in os.listdir(lab.membrane_dir) if f.startswith("snowman-default-"))
    path = os.path.join(lab.membrane_dir, trained)
    with safetensors.safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    tensors = safetensors.torch.load_file(path)
    zeros = {k: (v if k.endswith(".alpha") else torch.zeros_like(v)) for k, v in tensors.items()}
    safetensors.torch.save_file(zeros, os.path.join(lab.membrane_dir, "snowman_zeros.safetensors"), metadata=metadata)
    control = measure(Evaluator(lab, COUNT), Chain(lab, "zeros", ["snowman_zeros.safetensors"], "paper"),
                      panel("snowman", ["snowman"], TARGETS, OTHERS), with_paraphrases=False)
    assert control.erased < 0.95
