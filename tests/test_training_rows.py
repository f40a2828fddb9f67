"""Training matches inference: rollouts keep the membrane closed on the uncond row, as SPM Load Membrane
samples by default; an iteration with non-finite gradients (fp16 overflow) changes nothing."""

import torch
from pack import pack_module


class Recorder:
    """A NoisePredictor that records every call of the one it wraps."""

    def __init__(self, inner, backward_scale: float = 1.0) -> None:
        self.inner, self.calls, self.backward_scale = inner, [], backward_scale
        self.latent_channels = inner.latent_channels

    def sigmas(self, steps):
        return self.inner.sigmas(steps)

    def start(self, noise, sigma):
        return self.inner.start(noise, sigma)

    def eps(self, x, sigma, prompts):
        out = self.inner.eps(x, sigma, prompts)
        self.calls.append((x.detach().clone(), sigma.clone(), list(prompts), out.detach().clone()))
        return _ScaleGradient.apply(out, self.backward_scale)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def trainer_for(spm_world, backward_scale=1.0, **overrides):
    patcher, clip, _ = spm_world
    training, core = pack_module("nodes.training"), pack_module("spm_core.training")
    runtime, surrogates = pack_module("nodes.runtime"), pack_module("spm_core.surrogates")
    key_map, shapes = runtime.membrane_layers_of(patcher)
    names = {n: k for n, k in key_map.items() if training.DIFFUSERS_LAYER.match(n)}
    membrane = core.TrainableMembrane({n: shapes[k] for n, k in names.items()}, 1, 1.0, 0)
    with torch.no_grad():
        for up in membrane.up:
            up.normal_(std=0.5)  # an open membrane that visibly changes predictions
    membrane.attach({n: patcher.model.get_submodule(k) for n, k in names.items()})
    target, empty = training.encode(clip, "snoopy"), training.encode(clip, "")
    concept = core.ConceptPrompts(pack_module("spm_core.concepts").Concept("snoopy"), target, target, empty)
    config = core.TrainingConfig(iterations=2, learning_rate=1e-2, latent_sizes=[8], rollout_steps=4, anchor_samples=1,
                                 anchor_strength=1.0, contexts=0, **overrides)
    sampler = surrogates.make_sampler("prompts", target, lambda: ["a bowl of fruit", "a red car"], lambda t: training.encode(clip, t))
    predictor = Recorder(training.ComfyNoisePredictor(patcher), backward_scale)
    return core.Trainer(predictor, membrane, [concept], empty, sampler, config), membrane, predictor, empty


def test_rollout_keeps_the_membrane_closed_on_the_uncond_row(spm_world):
    trainer, membrane, predictor, empty = trainer_for(spm_world)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            trainer._rollout(trainer.concepts[0].target, 8, 3, torch.Generator().manual_seed(0))
            assert len(predictor.calls) == 3
            for x, sigma, prompts, out in predictor.calls:
                assert prompts[0] is empty
                closed = predictor.inner.eps(x, sigma, prompts)  # the membrane is disabled after the rollout
                assert torch.equal(out[0], closed[0]), "the uncond row must see the bare model"
                assert not torch.allclose(out[1], closed[1]), "the target row must see the membrane"
    finally:
        membrane.detach()


def test_iterations_with_non_finite_gradients_change_nothing(spm_world):
    trainer, membrane, predictor, _ = trainer_for(spm_world, backward_scale=float("inf"))
    before = [p.detach().clone() for p in membrane.parameters()]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            report = trainer.step(0)
    finally:
        membrane.detach()
    assert report.skipped and trainer.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, membrane.parameters()))
    assert all(torch.isfinite(p).all() for p in membrane.parameters())
