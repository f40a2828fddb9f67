"""The classifier-free erasure measure (spm_core.erasure) on a tiny SD1.5-architecture model:
0 for a membrane that changes nothing, exactly the constructed share for a model whose target
prediction is built from the bare positive and neutral predictions, and rising while a membrane
trains (measured: 0, 0.30, 1.24, 1.38 after 0, 3, 8, 16 iterations at lr 5e-3, no anchoring)."""

import pytest
import torch
from pack import pack_module
from tiny_models import build_clip, build_patcher

SIZE, STEPS, CFG = 8, 10, 3.0


@pytest.fixture(scope="module")
def world():
    training, core = pack_module("nodes.training"), pack_module("spm_core.training")
    patcher, clip = build_patcher("sd1", seed=0, prompt_gain=16), build_clip("sd1", seed=1)
    target, empty = training.encode(clip, "snoopy"), training.encode(clip, "")
    concept = core.ConceptPrompts(pack_module("spm_core.concepts").Concept("snoopy"), target, target, empty)
    return patcher, training.ComfyNoisePredictor(patcher), concept, empty


def attached_membrane(patcher):
    """A fresh (up = 0) trainable membrane hooked into the tiny model, as training builds it."""
    runtime, core = pack_module("nodes.runtime"), pack_module("spm_core.training")
    layer = pack_module("spm_core.file_format").DIFFUSERS_LAYER
    key_map, shapes = runtime.membrane_layers_of(patcher)
    names = {name: key for name, key in key_map.items() if layer.match(name)}
    membrane = core.TrainableMembrane({n: shapes[k] for n, k in names.items()}, rank=1, alpha=1.0, seed=0)
    membrane.attach({n: patcher.model.get_submodule(k) for n, k in names.items()})
    return membrane


def probes_for(world, seeds=(0, 1), at_steps=(2, 5)):
    _, model, concept, empty = world
    return pack_module("spm_core.erasure").make_probes(model, concept.target, empty, SIZE, seeds, STEPS, CFG, at_steps)


def test_probes_lie_on_the_trajectories_training_rolls_out(world):
    """With a membrane that changes nothing, the Trainer's own rollout from the same seed reaches
    the same latent at the same noise level."""
    patcher, model, concept, empty = world
    core = pack_module("spm_core.training")
    membrane = attached_membrane(patcher)
    try:
        trainer = core.Trainer(model, membrane, [concept], empty, None,
                               core.TrainingConfig(rollout_steps=STEPS, rollout_cfg=CFG, anchor_strength=0.0,
                                                   contexts=0))
        probes = probes_for(world, seeds=(3, 4), at_steps=(0, 4))
        for probe, (seed, k) in zip(probes, [(3, 0), (4, 0), (3, 4), (4, 4)]):
            x, sigma = trainer._rollout(concept.target, SIZE, k, torch.Generator().manual_seed(seed))
            assert torch.equal(probe.sigma, sigma)
            torch.testing.assert_close(probe.x, x, rtol=1e-4, atol=1e-5)
    finally:
        membrane.detach()


def test_a_membrane_of_zeros_reads_zero(world):
    patcher, model, concept, _ = world
    membrane = attached_membrane(patcher)
    try:
        level = pack_module("spm_core.erasure").erasure_level(
            model, lambda on: setattr(membrane, "enabled", on), concept, probes_for(world))
    finally:
        membrane.detach()
    assert abs(level) < 1e-4


class Blended:
    """The tiny model, except that while "the membrane" is on a target row is predicted as
    (1 - share) e_pos + share e_neu: by construction, erased by exactly `share`."""

    def __init__(self, model, concept, share: float) -> None:
        self.model, self.concept, self.share, self.on = model, concept, share, False
        self.latent_channels = model.latent_channels

    def sigmas(self, steps):
        return self.model.sigmas(steps)

    def start(self, noise, sigma):
        return self.model.start(noise, sigma)

    def eps(self, x, sigma, prompts):
        bare = self.model.eps(x, sigma, prompts)
        if not self.on:
            return bare
        rows = [i for i, p in enumerate(prompts) if p is self.concept.target]
        neutral = self.model.eps(x[rows], sigma[rows], [self.concept.neutral] * len(rows))
        bare[rows] = (1 - self.share) * bare[rows] + self.share * neutral
        return bare


@pytest.mark.parametrize("share", [1.0, 0.5, 2.0])
def test_a_target_predicted_as_the_neutral_prompt_reads_one(world, share):
    """1.0: the target's prediction equals the neutral's; 2.0: the erase target at guidance 1."""
    _, model, concept, _ = world
    blended = Blended(model, concept, share)
    level = pack_module("spm_core.erasure").erasure_level(
        blended, lambda on: setattr(blended, "on", on), concept, probes_for(world))
    assert level == pytest.approx(share, abs=1e-4)
    assert not blended.on, "the measure leaves the membrane off"


def test_level_rises_while_a_membrane_trains(world):
    patcher, model, concept, empty = world
    core, erasure = pack_module("spm_core.training"), pack_module("spm_core.erasure")
    membrane = attached_membrane(patcher)
    config = core.TrainingConfig(iterations=16, learning_rate=5e-3, latent_sizes=[SIZE], rollout_steps=STEPS,
                                 rollout_cfg=CFG, anchor_strength=0.0, seed=0, contexts=0)
    try:
        trainer = core.Trainer(model, membrane, [concept], empty, None, config)
        probes = probes_for(world)
        levels = []
        with torch.enable_grad():
            for iteration in range(config.iterations):
                if iteration in (0, 3, 8):
                    levels.append(erasure.erasure_level(model, lambda on: setattr(membrane, "enabled", on), concept, probes))
                trainer.step(iteration)
        levels.append(erasure.erasure_level(model, lambda on: setattr(membrane, "enabled", on), concept, probes))
    finally:
        membrane.detach()
    print("levels at 0, 3, 8, 16 iterations:", levels)
    assert abs(levels[0]) < 1e-4
    # the erase target (guidance 1) lies at level 2: past the neutral prediction (1) once trained
    assert 0 < levels[1] < levels[2] < levels[3] and levels[3] > 1.0, levels
