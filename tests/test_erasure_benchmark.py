"""The erasure benchmark's reduced run (`scripts/erasure_benchmark.py --quick`) as a test: a
snowman membrane trained with the pack's SPM Train Membrane code on the shipped miniature model, sampled
through SPM Load Membrane with each main transport and the official code's behaviour, 32 generations per
prompt read by the classifier. The thresholds are the project's targets (issue 8:
erase >= 95% of target generations, accuracy on other prompts within 2 points of the bare
model); the controls show the same measurement fails for a membrane that erases nothing and for
one that turns the concept into noise."""

from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch

from lab.benchmark import Evaluator, measure, panel
from lab.erasure_benchmark import OTHERS, TARGETS, erasure_experiments
from lab.harness import Lab
from lab.setups import Chain

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
    """On the attack's fixed scoring batch (every reference picture at a few noise levels), not on
    one random training batch."""
    for attack in quick["attacks"]:
        assert attack["final_loss"] < attack["start_loss"], attack


def test_the_rank4_membrane_erases_into_clean_pictures_and_keeps_the_rest(quick):
    """The robustness candidate (rank 4, 4 contexts) against issue 15's targets: >= 95% erased into
    clean pictures, accuracy within a point of bare. Its attack success is printed, not asserted:
    against the strongest attack it misses the target (README, Robustness)."""
    for setup in ("rank4, always open", "rank4, latent gate"):
        row = summary(quick, setup)
        assert row["erased"] >= 0.95, (setup, row)
        assert row["accuracy"] >= row["bare_accuracy"] - 0.01, (setup, row)


def test_the_guarded_gate_holds_against_the_strongest_quick_attack(quick):
    """Issue 15's floor (at most 25% of generations bring the concept back) against "a" + 8 free
    tokens optimised for 400 steps through the guarded gate's look-aheads and replacement; every
    membrane without it lets this attack through (README, Robustness)."""
    (row,) = [a for a in quick["attacks"] if a["setup"] == "guarded gate"]
    assert row["tokens"] == 8 and row["steps"] == 400, row
    assert row["found_under_membrane"] <= 0.25, row


def controlled(lab, name: str, weights) -> str:
    """A copy of the trained snowman membrane with every down/up tensor replaced by weights(tensor)."""
    trained = next(f for f in sorted(os.listdir(lab.membrane_dir)) if f.startswith("snowman-default-"))
    path = os.path.join(lab.membrane_dir, trained)
    with safetensors.safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    tensors = safetensors.torch.load_file(path)
    changed = {k: (v if k.endswith(".alpha") else weights(v)) for k, v in tensors.items()}
    safetensors.torch.save_file(changed, os.path.join(lab.membrane_dir, f"{name}.safetensors"), metadata=metadata)
    return f"{name}.safetensors"


def control_measure(lab, file: str):
    return measure(Evaluator(lab, COUNT), Chain(lab, file, [file], "paper"),
                   panel("snowman", ["snowman"], TARGETS, OTHERS), with_paraphrases=False)


def test_a_membrane_of_zeros_fails_the_erasure_check(lab, quick):
    control = control_measure(lab, controlled(lab, "snowman_zeros", torch.zeros_like))
    assert control.erased < 0.95


def test_a_destructive_membrane_fails_the_erasure_check(lab, quick):
    """Random weights at 10x the trained norm turn the target into garbage: the concept is gone, but
    a picture of noise is not an erased picture, so the erasure check itself must fail it."""
    generator = torch.Generator().manual_seed(0)

    def destructive(tensor: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(tensor.shape, generator=generator)
        return (noise * (10 * tensor.float().norm() / noise.norm())).to(tensor.dtype)

    control = control_measure(lab, controlled(lab, "snowman_destructive", destructive))
    assert control.erased < 0.95
    assert control.erased_into_noise > 0.5


def test_the_bare_model_draws_clean_pictures(lab, quick):
    evaluator = Evaluator(lab, COUNT)
    prompts = panel("snowman", ["snowman"], TARGETS, OTHERS)
    readings = [evaluator.read(evaluator.bare, r.text) for r in [*prompts.targets, *prompts.others]]
    assert sum(v.is_clean for r in readings for v in r.verdicts) / sum(len(r.verdicts) for r in readings) >= 0.95


def test_a_stack_logs_where_each_membrane_opened_on_prompts_not_naming_its_concept():
    """measure_stack's gate log (no sampling): per membrane, its mean gate over the prompts that do
    not name its concept, and each such gate of at least one half."""
    from lab.benchmark import off_target_gates
    from miniworld.world import Request

    requests = [Request("a tree", ("tree",)), Request("a green square", ("square", "green")),
                Request("a red circle", ("circle", "red"))]
    gates = {"a tree": [1.0, 0.0], "a green square": [1.0, 0.2], "a red circle": [0.25, 1.0]}
    means, opened = off_target_gates(gates, requests, ["tree", "circle"])
    assert means == {"tree": pytest.approx((1.0 + 0.25) / 2), "circle": pytest.approx(0.1)}
    assert opened == [("a green square", "tree", 1.0)]
