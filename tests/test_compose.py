"""The latent gate's bare pre-pass composes with what other nodes put on the MODEL: the host's own
Self-Attention Guidance and EasyCache nodes, and attention patches that read the chunk labels
ComfyUI's calc_cond_batch gives every model call (as IPAdapter Plus does), each run through a real
KSampler on the tiny SD1 model."""

from __future__ import annotations

import pytest
import torch
from pack import encode, load_spm, pack_module, sample


@pytest.fixture(autouse=True)
def _unload_after_each_test():
    yield
    import comfy.model_management

    comfy.model_management.unload_all_models()  # other tests count the hooks on the shared tiny UNet


PROMPTS = ("snoopy", "a bowl of fruit")
# the latent gate's pre-pass asks the bare model (run_bare) 2 x 4 times for its look-ahead (the prompts,
# the empty prompt), then once for the concepts and once for the prompts
PRE_PASS_CALLS = 2 * 4 + 2


def latent_model(spm_world):
    patcher, clip, _ = spm_world
    return load_spm(patcher, clip, "snoopy.safetensors", transport="latent")


def latent_gates_of_last_run(model) -> list[list[float]]:
    """The latent gates the last sampling run measured, one row per cond, in a stable order."""
    state = model.get_attachment(pack_module("nodes.runtime").KEY)
    return sorted(gates[0].tolist() for gates in state._latent_gates.values())


def conds(spm_world):
    _, clip, _ = spm_world
    return tuple(encode(clip, text) for text in PROMPTS)


def record_bare_predictions(model, monkeypatch) -> list[torch.Tensor]:
    """Every prediction the pre-pass gets from the bare model, in order (the latent gates of the tiny
    model sit at 0 or 1, so the predictions tell more)."""
    state = model.get_attachment(pack_module("nodes.runtime").KEY)
    measure, recorded = state.latent_gates, []

    def latent_gates(run_bare, *args):
        def recording(*run_args):
            recorded.append(run_bare(*run_args).clone())
            return recorded[-1]
        return measure(recording, *args)

    monkeypatch.setattr(state, "latent_gates", latent_gates)
    return recorded


def test_latent_gate_composes_with_self_attention_guidance(spm_world, monkeypatch):
    """SAG's attention replacement reads cond_or_uncond on every call of the middle block: the
    pre-pass runs under it and asks the model what it asks without SAG, and SAG still guides."""
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    model = latent_model(spm_world)
    predictions = record_bare_predictions(model, monkeypatch)
    positive, negative = conds(spm_world)
    plain = sample(model, positive, negative)
    plain_gates, plain_predictions = latent_gates_of_last_run(model), predictions[:]
    predictions.clear()
    guided_model = SelfAttentionGuidance.execute(model, 0.5, 2.0).result[0]
    guided = sample(guided_model, positive, negative)
    assert torch.isfinite(guided).all()
    assert len(predictions) == len(plain_predictions) == PRE_PASS_CALLS, "one pre-pass: look-ahead, concepts, conds"
    for with_sag, without in zip(predictions, plain_predictions):
        assert torch.allclose(with_sag, without, atol=1e-5)
    assert latent_gates_of_last_run(guided_model) == plain_gates == [[0.0], [1.0]], "snoopy opens, fruit stays closed"
    assert (guided - plain).abs().max() > 1e-3, "SAG changed nothing: its guidance did not run"


class EasyCacheSpy:
    """A DIFFUSION_MODEL wrapper inside EasyCache's: on every call that reaches the model it
    records the call's uuids and the cond EasyCache tracks steps by."""

    def __init__(self) -> None:
        self.calls: list[tuple[list, object]] = []

    def __call__(self, executor, *args, **kwargs):
        options = kwargs.get("transformer_options", args[5] if len(args) > 5 else {})
        output = executor(*args, **kwargs)
        self.calls.append((list(options["uuids"]), options["easycache"].first_cond_uuid))
        return output


def test_latent_gate_composes_with_easycache(spm_world):
    """EasyCache caches model calls by cond uuid and takes the first call it sees as the cond that
    says when to skip a step: the pre-pass is no sampling step, so EasyCache never sees it, keeps a
    sampling cond as its first cond, and still skips steps."""
    from comfy.patcher_extension import WrappersMP
    from comfy_extras.nodes_easycache import EasyCacheNode

    cached = EasyCacheNode.execute(latent_model(spm_world), 3.0, 0.0, 1.0, False).result[0]
    spy = EasyCacheSpy()
    cached.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "easycache_spy", spy)
    positive, negative = conds(spm_world)
    out = sample(cached, positive, negative, steps=8)
    assert torch.isfinite(out).all()
    assert spy.calls, "the sampler never called the model"
    sampling_uuids = spy.calls[-1][0]
    assert len(sampling_uuids) == 2
    for uuids, first_cond in spy.calls:
        assert uuids == sampling_uuids, "a call that was not a sampling step reached EasyCache"
        assert first_cond in sampling_uuids, "EasyCache tracks steps by a cond sampling never uses"
    assert len(spy.calls) < 8, "EasyCache skipped no step"


def test_latent_gate_gives_attention_patches_the_chunk_labels_of_every_call(spm_world):
    """An attention patch reading transformer_options["cond_or_uncond"] and ["uuids"] (IPAdapter Plus
    picks each chunk's image embedding by them) gets, on every call the pre-pass included, one label
    and one uuid per chunk; the pre-pass rows are conditional prompts (label 0), one row each."""
    model = latent_model(spm_world).clone()
    seen: list[tuple[int, list[int], list, torch.Tensor]] = []

    def read_labels(n, context, value, extra_options):
        labels, uuids = extra_options["cond_or_uncond"], extra_options["uuids"]
        assert isinstance(labels, list) and all(isinstance(label, int) for label in labels), labels
        assert len(uuids) == len(labels) and n.shape[0] % len(labels) == 0, (n.shape, labels, uuids)
        seen.append((n.shape[0], list(labels), list(uuids), extra_options["sigmas"]))
        return n, context, value

    model.set_model_attn2_patch(read_labels)
    positive, negative = conds(spm_world)
    out = sample(model, positive, negative, steps=2)
    assert torch.isfinite(out).all()
    sampling = [call for call in seen if sorted(call[1]) == [0, 1]]
    sampling_uuids = {uuid for call in sampling for uuid in call[2]}
    pre_pass = [call for call in seen if not set(call[2]) & sampling_uuids]
    assert sampling and pre_pass, "both the pre-pass and the sampling calls reach the patch"
    assert len(sampling) + len(pre_pass) == len(seen), "a call mixed sampling conds with others"
    for batch, labels, uuids, sigmas in pre_pass:
        assert labels == [0] * batch and len(set(uuids)) == batch, (batch, labels)
        assert torch.equal(sigmas, sampling[0][3]), "the pre-pass runs at the first step's sigma"


def tiny_controlnet(seed: int = 5):
    """A ControlNet for the tiny SD1 UNet, built from ComfyUI's own classes with random weights."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management
    import comfy.ops
    from tiny_models import model_config_for, randomize_

    config = dict(model_config_for("sd1").unet_config)
    config.pop("out_channels")
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")
    control_model = randomize_(comfy.cldm.cldm.ControlNet(**config), seed, std=0.2)
    return comfy.controlnet.ControlNet(control_model, load_device=comfy.model_management.get_torch_device())


def test_latent_gate_sees_the_controlnet_that_sampling_sees(spm_world, monkeypatch):
    """A ControlNet adds its residuals to every sampling call; the pre-pass asks the bare model with the
    same residuals (row by row), so the gate measures what the controlled model is about to draw."""
    import nodes

    model = latent_model(spm_world)
    predictions = record_bare_predictions(model, monkeypatch)
    positive, negative = conds(spm_world)
    plain = sample(model, positive, negative)
    plain_predictions = predictions[:]
    predictions.clear()
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    controlled_positive, controlled_negative = nodes.ControlNetApplyAdvanced().apply_controlnet(
        positive, negative, tiny_controlnet(), hint, 1.0, 0.0, 1.0)
    controlled = sample(model, controlled_positive, controlled_negative)
    assert torch.isfinite(controlled).all() and (controlled - plain).abs().max() > 1e-3, "the ControlNet did nothing"
    assert len(predictions) == len(plain_predictions) == PRE_PASS_CALLS
    assert all((with_control - without).abs().max() > 1e-4 for with_control, without in zip(predictions, plain_predictions))
