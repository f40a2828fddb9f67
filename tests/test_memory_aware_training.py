"""Memory-aware training (issue 17, deliver 3), on tiny models from ComfyUI's classes: gradient
checkpointing of the transformer blocks (spm_core/recompute.py, wired in nodes/training.py), the base
weights used in place instead of copied, an fp8 Flux base under an fp32 membrane, and the rollouts'
CFG left to the model or set.

What memory a full-size Flux needs is printed by `python scripts/training_memory.py`;
no GPU is here to measure it on one.
"""

from __future__ import annotations

import contextlib
import statistics

import pytest
import torch
from pack import pack_module
from test_training import train
from tiny_models import build_clip, build_flux_clip, build_flux_patcher, build_patcher


@pytest.fixture(scope="module")
def models(spm_world):
    pack_module("nodes")
    return {"sd1": (build_patcher("sd1", seed=0, prompt_gain=16), build_clip("sd1", seed=1)),
            "flux": (build_flux_patcher(seed=3, prompt_gain=8), build_flux_clip(seed=4))}


@contextlib.contextmanager
def counted_saves(total: list[int]):
    """Adds up the bytes autograd keeps for backward (weights excluded), copying them as the trainer
    does on Flux, whose blocks add into what they saved."""
    def pack(saved: torch.Tensor) -> torch.Tensor:
        if saved.is_leaf:
            return saved
        total[0] += saved.numel() * saved.element_size()
        return saved.clone()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
        yield


def membrane_gradients(patcher, clip, checkpointing: bool) -> tuple[list[torch.Tensor], int]:
    """The gradient of a loss on two rows (the membrane on the first only) for every membrane parameter
    and for the first row's conditioning, the membrane switched off before backward as the trainer does,
    and the bytes kept for backward."""
    training, core = pack_module("nodes.training"), pack_module("spm_core.training")
    modules = training.trained_layers(patcher, single_blocks=True)  # the masked single-block layers recomputed too
    membrane = core.TrainableMembrane.for_modules(modules, rank=2, alpha=1.0, seed=0)
    with torch.no_grad():
        for index, up in enumerate(membrane.up):
            up.copy_(torch.randn(up.shape, generator=torch.Generator().manual_seed(index)) * 0.1)
    membrane.attach(modules, pack_module("nodes.architectures").text_stream_blocks(patcher.model))
    predictor = training.ComfyNoisePredictor(patcher)
    prompts = [training.encode(clip, "snoopy"), training.encode(clip, "a red car")]
    searched = prompts[0].embedding.clone()  # as an adversarial search moves the conditioning
    generator = torch.Generator().manual_seed(1)
    channels = patcher.model.latent_format.latent_channels
    x, sigma = torch.randn(2, channels, 8, 8, generator=generator), torch.tensor([0.7, 0.7])
    target = torch.randn(2, channels, 8, 8, generator=generator)
    diffusion_model = patcher.model.diffusion_model
    blocks = training.checkpointed_blocks(diffusion_model, membrane, training.copies_of_saved_activations) \
        if checkpointing else contextlib.nullcontext()
    saved = [0]
    try:
        with torch.inference_mode(False), torch.enable_grad(), blocks:
            membrane.enabled, membrane.row_mask = True, torch.tensor([1.0, 0.0])
            searched.requires_grad_(True)
            rows = [type(prompts[0])(searched, prompts[0].pooled), prompts[1]]
            with counted_saves(saved):
                loss = torch.nn.functional.mse_loss(predictor.eps(x, sigma, rows), target)
            membrane.enabled, membrane.row_mask = False, None
            with training.copies_of_saved_activations():
                gradients = torch.autograd.grad(loss, [*membrane.parameters(), searched])
    finally:
        membrane.detach()
    assert "forward" not in diffusion_model.__dict__ and not any("forward" in m.__dict__ for m in diffusion_model.modules()), \
        "every block's own forward is back"
    return list(gradients), saved[0]


@pytest.mark.parametrize("family", ["sd1", "flux"])
def test_checkpointed_blocks_give_the_same_gradients_and_keep_far_fewer_activations(models, family):
    """The gradients to the membrane and to the conditioning (what an adversarial search follows) are
    those of the plain pass (the row mask and switch replayed in the recomputation), and what is kept
    for backward is the blocks' inputs, not their insides."""
    patcher, clip = models[family]
    plain, plain_bytes = membrane_gradients(patcher, clip, checkpointing=False)
    checkpointed, checkpointed_bytes = membrane_gradients(patcher, clip, checkpointing=True)
    assert any(g.abs().max() > 0 for g in plain)
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max() + 1e-12))
    print(family, "bytes kept for backward", plain_bytes, "->", checkpointed_bytes)
    assert checkpointed_bytes < 0.5 * plain_bytes


# with an adversarial prompt searched through the checkpointed blocks (20 Adam steps on the tokens, then
# lr 5e-2 on the membrane), float rounding of the conditioning's gradient (1.5e-7 relative) grows to ~1e-4
@pytest.mark.parametrize("family, extra, tolerance", [
    ("flux", {}, 1e-5), ("sd1", {"adversaries": 1, "adversary_every": 2, "contexts": 1}, 1e-3)])
def test_checkpointed_training_trains_the_same_membrane_and_records_it(models, tmp_path, family, extra, tolerance):
    """Also on SD1 with an adversarial prompt searched through the text encoder and the checkpointed blocks."""
    patcher, clip = models[family]
    settings = dict(iterations=6, learning_rate=5e-2, anchor_strength=1.0, erasure_every=3, **extra)
    plain, plain_reports, _ = train(patcher, clip, tmp_path / "plain.safetensors", **settings)
    checkpointed, reports, _ = train(patcher, clip, tmp_path / "checkpointed.safetensors", gradient_checkpointing=True,
                                     **settings)
    assert [r.loss for r in reports] == pytest.approx([r.loss for r in plain_reports], rel=1e-4)
    for name, layer in plain.layers.items():
        assert torch.allclose(layer.up, checkpointed.layers[name].up, atol=tolerance)
        assert torch.allclose(layer.down, checkpointed.layers[name].down, atol=tolerance)
    assert any(layer.up.abs().max() > 0 for layer in checkpointed.layers.values()), "it trained"
    assert checkpointed.metadata["training"]["gradient_checkpointing"] is True


def test_the_models_weights_are_frozen_in_place_for_training_not_copied():
    """Weights ComfyUI loaded under inference mode cannot be saved for backward: training swaps each
    for an ordinary tensor on the same memory; weights that ask for a gradient stop asking, so no
    layer keeps its input for one. Everything is as it was afterwards."""
    training = pack_module("nodes.training")
    with torch.inference_mode():
        loaded = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    built = torch.nn.Linear(2, 3)
    originals = list(loaded.parameters())
    with torch.inference_mode(False):
        x = torch.randn(3, 4, requires_grad=True)
        with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
            loaded(x).sum().backward()
        with training.frozen_weights(loaded), training.frozen_weights(built):
            swapped = list(loaded.parameters())
            assert not any(p.is_inference() or p.requires_grad for p in [*swapped, *built.parameters()])
            assert [p.data_ptr() for p in swapped] == [p.data_ptr() for p in originals], "no copy"
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                built(loaded(x)).sum().backward()
            assert not any(t.shape == (3, 8) for t in saved), "the second layer's input is not kept for its weight"
        assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(a is b for a, b in zip(loaded.parameters(), originals))
    assert all(p.requires_grad and p.grad is None for p in built.parameters())


def test_an_fp8_flux_trains_an_fp32_membrane_and_keeps_its_weights(tmp_path):
    """ComfyUI runs an fp8 checkpoint with its weights stored in fp8 and cast per layer; the membrane
    trains in fp32 over it (with checkpointing, as on a 24 GB GPU) and the weights stay as they were."""
    patcher, clip = build_flux_patcher(seed=3, prompt_gain=8, weight_dtype=torch.float8_e4m3fn), build_flux_clip(seed=4)
    before = {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    assert {v.dtype for v in before.values()} == {torch.float8_e4m3fn}
    membrane, reports, _ = train(patcher, clip, tmp_path / "fp8.safetensors", iterations=80, learning_rate=5e-2,
                                 anchor_strength=1.0, gradient_checkpointing=True)
    erase = [r.erase_loss for r in reports]
    assert not any(r.skipped for r in reports)
    assert statistics.mean(erase[-10:]) < 0.8 * statistics.mean(erase[:10])
    assert all(layer.up.dtype == torch.float32 for layer in membrane.layers.values())
    after = patcher.model.diffusion_model.state_dict()
    assert all(after[k].dtype == torch.float8_e4m3fn and torch.equal(after[k].view(torch.uint8), v.view(torch.uint8))
               for k, v in before.items())


def test_rollouts_follow_the_model_unless_a_cfg_is_set(models, tmp_path):
    """Not set: Flux.1 rolls out at CFG 1 without an uncond row, an SD model at 3. Set: a Flux
    derivative sampled with CFG rolls out with it (and its uncond row)."""
    flux, flux_clip = models["flux"]
    sd1, sd1_clip = models["sd1"]
    settings = dict(iterations=8, anchor_samples=0, anchor_strength=0.0)
    _, _, left_rows = train(flux, flux_clip, tmp_path / "left.safetensors", **settings)
    set_membrane, _, set_rows = train(flux, flux_clip, tmp_path / "set.safetensors", rollout_cfg=4.0, **settings)
    sd1_membrane, _, _ = train(sd1, sd1_clip, tmp_path / "sd1.safetensors", **settings)
    assert set_membrane.metadata["training"]["rollout_cfg"] == 4.0
    assert sd1_membrane.metadata["training"]["rollout_cfg"] == 3.0
    assert set_rows > left_rows + 2, "the same draws of k, each rollout step with an uncond row more"


@pytest.mark.parametrize("settings, message", [
    (dict(rollout_cfg=0.5), r"rollout CFG 0.5 is outside 1..30"),
    (dict(gradient_checkpointing="yes"), r"gradient checkpointing must be true or false, not 'yes'"),
    (dict(single_blocks=1), r"single blocks must be true or false, not 1"),
])
def test_bad_memory_settings_are_refused_by_name(settings, message):
    core, errors = pack_module("spm_core.training"), pack_module("spm_core.errors")
    with pytest.raises(errors.SPMError, match=message):
        core.TrainingConfig(**settings).check()


def test_running_out_of_memory_says_what_to_change_and_keeps_what_was_trained(models, tmp_path, monkeypatch):
    """A GPU that runs out of memory in the fourth iteration (raised here by the model adapter): the
    error names the settings that need less memory, and the iterations done are kept for resume."""
    patcher, clip = models["flux"]
    training, errors = pack_module("nodes.training"), pack_module("spm_core.errors")
    predict, calls = training.ComfyNoisePredictor._predict, []

    def running_out(self, x, sigma, prompts):
        calls.append(len(prompts))
        if len(calls) > 3 and torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return predict(self, x, sigma, prompts)

    monkeypatch.setattr(training.ComfyNoisePredictor, "_predict", running_out)
    with pytest.raises(errors.SPMError, match=r"training ran out of memory: switch on gradient_checkpointing; or load "
                                              r"the model's fp8 version .*; or lower latent_size, contexts or "
                                              r"anchor_samples .*; what was trained is kept in oom.partial.safetensors"):
        train(patcher, clip, tmp_path / "oom.safetensors", iterations=10, rollout_steps=2)
    assert (tmp_path / "oom.partial.safetensors").exists() and not (tmp_path / "oom.safetensors").exists()


def test_on_a_full_size_flux_checkpointing_keeps_a_small_share_of_the_activations():
    """scripts/training_memory.py's count on ComfyUI's Flux.1-dev class (meta device, one row at 512 px):
    what backward keeps drops to the blocks' inputs, and its weights count as 12B parameters."""
    from scripts.training_memory import measure

    plain = measure(torch.bfloat16, 1, 512, checkpointing=False, single_blocks=True)
    checkpointed = measure(torch.bfloat16, 1, 512, checkpointing=True, single_blocks=True)
    print("full-size Flux, 1 row, 512 px: kept", plain["kept"] / 1e9, "GB ->", checkpointed["kept"] / 1e9, "GB")
    assert 23.5e9 < plain["weights"] < 24.0e9
    assert checkpointed["kept"] < 0.1 * plain["kept"]
    assert checkpointed["weights"] == plain["weights"]
