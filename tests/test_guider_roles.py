"""Each CFG chunk is gated by its own cond's role, read from the guider (never from the chunk's
position), under every guider ComfyUI ships: KSampler, SamplerCustom's CFGGuider, DualCFGGuider,
PerpNegGuider and Self-Attention Guidance, with batch 2 and an area cond. Every row of every
model call is checked against the cond whose embedding it carries."""

from __future__ import annotations

import comfy.samplers
import pytest
import torch
from pack import encode, load_spm, pack_module

import nodes


@pytest.fixture(autouse=True)
def _unload_after_each_test():
    yield
    import comfy.model_management

    comfy.model_management.unload_all_models()  # other tests count the hooks on the shared tiny UNet


class RowSpy:
    """A DIFFUSION_MODEL wrapper recording each call's per-row gates and context."""

    def __init__(self, stack) -> None:
        self.stack, self.calls = stack, []

    def __call__(self, executor, *args, **kwargs):
        gates = self.stack.current_row_gates()
        context = kwargs["context"] if "context" in kwargs else args[2]  # UNetModel._forward(x, timesteps, context, ...)
        self.calls.append((torch.zeros(context.shape[0], 1) if gates is None else gates.clone(), context.clone()))
        return executor(*args, **kwargs)


def spied_model(spm_world, rows, transport="calibrated", negative_strength=None):
    from comfy.patcher_extension import WrappersMP

    patcher, clip, _ = spm_world
    model = load_spm(patcher, clip, "snoopy.safetensors", transport=transport, rows=rows, negative_strength=negative_strength)
    spy = RowSpy(model.get_attachment(pack_module("nodes.runtime").KEY).stack)
    model = model.clone()
    model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "row_spy", spy)
    return model, spy


def with_area(conditioning):
    (area,) = nodes.ConditioningSetArea().append(conditioning, 32, 32, 0, 0, 1.0)
    return area


def run_guider(kind: str, model, prompts: dict[str, list]):
    """Samples 2 latents with the named guider; `prompts` maps the guider's cond names to CONDITIONING."""
    latent = torch.zeros(2, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 2)
    sampler = comfy.samplers.sampler_object("euler")
    if kind == "KSampler":
        nodes.KSampler().sample(model, 1, 2, 5.0, "euler", "normal", prompts["positive"], prompts["negative"],
                                {"samples": latent})
        return
    if kind == "SAG":
        from comfy_extras.nodes_sag import SelfAttentionGuidance

        patched = SelfAttentionGuidance.execute(model, 0.5, 2.0).result[0]
        nodes.KSampler().sample(patched, 1, 2, 5.0, "euler", "normal", prompts["positive"], prompts["negative"],
                                {"samples": latent})
        return
    if kind == "CFGGuider":
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(prompts["positive"], prompts["negative"])
        guider.set_cfg(5.0)
    elif kind == "DualCFGGuider":
        from comfy_extras.nodes_custom_sampler import Guider_DualCFG

        guider = Guider_DualCFG(model)
        guider.set_conds(prompts["positive"], prompts["middle"], prompts["negative"])
        guider.set_cfg(5.0, 3.0)
    else:
        from comfy_extras.nodes_perpneg import Guider_PerpNeg

        guider = Guider_PerpNeg(model)
        guider.set_conds(prompts["positive"], prompts["negative"], prompts["empty_negative_prompt"])
        guider.set_cfg(5.0, 1.0)
    guider.sample(noise, latent, sampler, sigmas, seed=1)


GUIDER_CONDS = {
    "KSampler": {"positive": "snoopy", "negative": "snoopy dog"},
    "SAG": {"positive": "snoopy", "negative": "snoopy dog"},
    "CFGGuider": {"positive": "snoopy", "negative": "snoopy dog"},
    "DualCFGGuider": {"positive": "a bowl of fruit on a table", "middle": "snoopy on a doghouse", "negative": "snoopy dog"},
    "PerpNegGuider": {"positive": "snoopy", "negative": "snoopy dog", "empty_negative_prompt": "a bowl of fruit"},
}
NEGATIVE_ROLE = {"negative", "empty_negative_prompt"}


ROW_SETTINGS = [("positive only", None), ("negative only", None), ("positive and negative", None),
                ("positive and negative", 0.5)]


def strength_on(role: str, rows: str, negative_strength: float | None) -> float:
    """What the rows setting promises: the membrane's strength on rows of a cond named `role`."""
    if role in NEGATIVE_ROLE:
        return 0.0 if rows == "positive only" else (1.0 if negative_strength is None else negative_strength)
    return 0.0 if rows == "negative only" else 1.0


@pytest.mark.parametrize("rows, negative_strength", ROW_SETTINGS, ids=[f"{r}-{n}" for r, n in ROW_SETTINGS])
@pytest.mark.parametrize("kind", list(GUIDER_CONDS))
def test_every_row_gets_its_own_conds_gate(spm_world, kind, rows, negative_strength):
    """Each row's effective gate (gate x strength) as its cond's role and the rows setting say."""
    _, clip, _ = spm_world
    model, spy = spied_model(spm_world, rows, negative_strength=negative_strength)
    texts = GUIDER_CONDS[kind]
    prompts = {name: encode(clip, text) for name, text in texts.items()}
    prompts["positive"] = prompts["positive"] + with_area(encode(clip, texts["positive"] + " in a field"))
    expected_by_embedding = []
    for name, conditioning in prompts.items():
        # prompts naming "snoopy" open fully (token overlap 1); the others stay closed (calibrated 0)
        opens = "snoopy" in texts[name]
        for embedding, _ in conditioning:
            expected_by_embedding.append((embedding[0], strength_on(name, rows, negative_strength) if opens else 0.0, name))
    run_guider(kind, model, prompts)

    assert spy.calls, "the sampler never called the model"
    seen = set()
    for gates, context in spy.calls:
        for row in range(context.shape[0]):
            matches = [(gate, name) for embedding, gate, name in expected_by_embedding if torch.equal(context[row], embedding)]
            if not matches:
                continue  # a row whose conditioning is not one of ours (SAG's blurred pass reuses the uncond)
            gate, name = matches[0]
            seen.add(name)
            assert gates[row, 0].item() == pytest.approx(gate, abs=1e-6), f"{kind}: row {row} ({name}) got {gates[row, 0].item()}"
    assert seen == set(texts), f"{kind}: rows of {set(texts) - seen} never seen"


def test_official_code_gates_the_whole_batch_by_the_positive_prompt(spm_world):
    """transport 'official_code': the positive prompt's gate on every row, the negative row too
    (by default that row is closed, or gated by its own prompt)."""
    _, clip, _ = spm_world
    model, spy = spied_model(spm_world, "positive only", transport="official_code")
    run_guider("KSampler", model, {"positive": encode(clip, "snoopy on a skateboard"), "negative": encode(clip, "a bowl of fruit")})
    assert spy.calls
    for gates, _ in spy.calls:
        assert gates[:, 0].tolist() == [1.0] * gates.shape[0]


def test_official_code_cannot_be_mixed_with_other_transports_in_a_chain(spm_world):
    """The refusal names each node of the chain with its transport, so the user knows which to change."""
    patcher, clip, _ = spm_world
    errors = pack_module("spm_core.errors")
    official = load_spm(patcher, clip, "snoopy.safetensors", transport="official_code", uid="7")
    with pytest.raises(errors.SPMError, match="on every SPM Load Membrane of the chain") as caught:
        load_spm(official, clip, "mickey_mouse.safetensors", transport="paper", uid="12")
    assert "node 7: snoopy (official_code)" in str(caught.value)
    assert "node 12: mickey_mouse (paper)" in str(caught.value)


def test_official_code_refuses_rows_that_would_never_act(spm_world):
    """The official scripts gate every row by the positive prompt, so a membrane kept off the positive
    rows would stay closed everywhere: 'negative only' is refused by name at load, the model untouched."""
    patcher, clip, _ = spm_world
    errors = pack_module("spm_core.errors")
    before = dict(patcher.attachments)
    with pytest.raises(errors.SPMError, match="transport 'official_code' with rows 'negative only' would never act") as caught:
        load_spm(patcher, clip, "snoopy.safetensors", transport="official_code", rows="negative only", negative_strength=2.0)
    assert "negative_strength" in str(caught.value) and "'positive only'" in str(caught.value)
    assert dict(patcher.attachments) == before
    load_spm(patcher, clip, "snoopy.safetensors", transport="official_code", rows="positive and negative")


@pytest.mark.parametrize("ramp", ["fade in", "fade out"])
def test_a_ramp_moves_the_strength_across_the_sampling_range(spm_world, ramp):
    """Over a 6-step KSampler run on a prompt that opens the membrane fully, the effective gate of
    the positive row follows the ramp: 0 -> 1 (fade in) or 1 -> 0 (fade out), monotonically."""
    from comfy.patcher_extension import WrappersMP

    patcher, clip, _ = spm_world
    model = load_spm(patcher, clip, "snoopy.safetensors", transport="calibrated", ramp=ramp)
    spy = RowSpy(model.get_attachment(pack_module("nodes.runtime").KEY).stack)
    model = model.clone()
    model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "row_spy", spy)
    prompt = encode(clip, "snoopy")
    nodes.KSampler().sample(model, 1, 6, 5.0, "euler", "normal", prompt, encode(clip, "a bowl of fruit"),
                            {"samples": torch.zeros(1, 4, 8, 8)})
    positive = []
    for gates, context in spy.calls:  # the row carrying the positive prompt, wherever the batch put it
        (row,) = [r for r in range(context.shape[0]) if torch.equal(context[r], prompt[0][0][0])]
        positive.append(gates[row, 0].item())
    assert len(positive) == 6
    ordered = positive if ramp == "fade in" else positive[::-1]
    assert ordered == sorted(ordered) and ordered[0] < 0.05 and ordered[-1] > 0.75, positive


def test_a_ramp_also_holds_for_calls_that_bypass_the_guider(spm_world):
    """A model call without the guider's chunk table (no uuids) gets the same ramp: fade out gives
    full strength at the start of sampling and half of it halfway."""
    patcher, clip, _ = spm_world
    model = load_spm(patcher, clip, "snoopy.safetensors", transport="always_open", ramp="fade out")
    state = model.get_attachment(pack_module("nodes.runtime").KEY)
    sampling = model.get_model_object("model_sampling")
    context = encode(clip, "snoopy")[0][0].expand(2, -1, -1)
    strengths = [state.call_gates(context, {}, torch.tensor([sampling.percent_to_sigma(percent)]), sampling)[1]
                 for percent in (0.01, 0.5)]
    assert strengths[0].flatten().tolist() == pytest.approx([0.99, 0.99], abs=0.01)
    assert strengths[1].flatten().tolist() == pytest.approx([0.5, 0.5], abs=0.01)
