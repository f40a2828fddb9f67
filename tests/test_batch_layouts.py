"""Gates hold however ComfyUI lays a step's rows out: cond and uncond split into separate model calls
(low memory, large pictures), a positive area cond whose copy ComfyUI adds to the negative list
under the positive's uuid, a conditioning carrying one prompt per batch item (batch-prompt and
prompt-schedule nodes), SDXL's pooled vector per row, and a concept bank larger than the sampling
batch. Each runs a real KSampler on the tiny models; "split" makes ComfyUI believe no memory is free,
so its calc_cond_batch runs every chunk alone."""

from __future__ import annotations

import pytest
import torch
from pack import encode, load_spm, pack_module
from test_compose import PRE_PASS_CALLS
from test_guider_roles import run_guider, spied_model, with_area

import nodes


@pytest.fixture(autouse=True)
def _unload_after_each_test():
    yield
    import comfy.model_management

    comfy.model_management.unload_all_models()  # other tests count the hooks on the shared tiny UNet


@pytest.fixture
def split_batches(monkeypatch):
    """Make ComfyUI's calc_cond_batch run each chunk (cond, uncond, area copies) in a call of its own."""
    import comfy.model_management

    free_memory = comfy.model_management.get_free_memory

    def none_free_for_batching(device=None, torch_free_too=False):
        # calc_cond_batch asks for the free memory alone; attention asks for (total, torch) and keeps its answer
        return free_memory(device, torch_free_too) if torch_free_too else 0

    monkeypatch.setattr(comfy.model_management, "get_free_memory", none_free_for_batching)


def gates_by_row(spy, embeddings: dict[str, torch.Tensor]) -> dict[str, set[float]]:
    """Every gate the spied model calls gave a row carrying each named embedding."""
    seen: dict[str, set[float]] = {name: set() for name in embeddings}
    for gates, context in spy.calls:
        for row in range(context.shape[0]):
            for name, embedding in embeddings.items():
                if torch.equal(context[row], embedding):
                    seen[name].add(round(gates[row, 0].item(), 6))
    return seen


@pytest.mark.parametrize("layout", ["batched", "split"])
def test_official_code_gates_the_negative_row_by_the_positive_prompt_whatever_the_batching(spm_world, layout, request):
    """The official scripts give the negative row the positive prompt's gate. ComfyUI runs the negative
    alone when memory is short; that call holds no positive row, and still gets the positive's gate."""
    if layout == "split":
        request.getfixturevalue("split_batches")
    _, clip, _ = spm_world
    model, spy = spied_model(spm_world, "positive only", transport="official_code")
    positive, negative = encode(clip, "snoopy on a skateboard"), encode(clip, "a bowl of fruit")
    run_guider("KSampler", model, {"positive": positive, "negative": negative})
    seen = gates_by_row(spy, {"positive": positive[0][0][0], "negative": negative[0][0][0]})
    assert seen == {"positive": {1.0}, "negative": {1.0}}
    if layout == "split":
        assert max(context.shape[0] for _, context in spy.calls) == 2, "the batch of 2 was not split into chunks"


def test_latent_gate_of_an_area_cond_is_its_own_when_chunks_are_split(spm_world, split_batches):
    """ComfyUI copies a positive area cond into the negative list under the positive's uuid, carrying the
    negative's embedding. Run alone (and first), that copy must not lend the positive area cond the
    latent gate measured on the negative prompt (negative rows are gated too here, so both are measured)."""
    _, clip, _ = spm_world
    model, spy = spied_model(spm_world, "positive and negative", transport="latent")
    (fruit,) = nodes.CLIPTextEncode().encode(clip, "a bowl of fruit")  # no token ids: the text gate is cosine alone
    (snoopy,) = nodes.CLIPTextEncode().encode(clip, "snoopy")
    run_guider("KSampler", model, {"positive": with_area(fruit), "negative": snoopy})
    state = model.get_attachment(pack_module("nodes.runtime").KEY)
    assert max(gates.max().item() for gates in state._latent_gates.values()) == 1.0, "the snoopy prompt opened nothing"
    assert gates_by_row(spy, {"fruit": fruit[0][0][0]}) == {"fruit": {0.0}}


@pytest.mark.parametrize("transport", ["calibrated", "latent"])
@pytest.mark.parametrize("order", [("a bowl of fruit", "snoopy"), ("snoopy", "a bowl of fruit")])
def test_each_batch_item_is_gated_by_its_own_prompt(spm_world, transport, order):
    """A CONDITIONING whose tensor holds one prompt per batch item (what batch-prompt nodes make): ComfyUI
    gives batch item r the prompt r, and the membrane opens for the snoopy item only."""
    _, clip, _ = spm_world
    model, spy = spied_model(spm_world, "positive only", transport=transport)
    embeddings = [nodes.CLIPTextEncode().encode(clip, text)[0][0][0] for text in order]
    batch_prompts = [[torch.cat(embeddings), {}]]
    (negative,) = nodes.CLIPTextEncode().encode(clip, "a bowl of fruit")
    run_guider("KSampler", model, {"positive": batch_prompts, "negative": negative})  # 2 latents
    expected = [1.0 if text == "snoopy" else 0.0 for text in order]
    positive_rows = [gates[:2, 0].tolist() if torch.equal(context[:2], torch.cat(embeddings)) else gates[2:, 0].tolist()
                     for gates, context in spy.calls]
    assert positive_rows and all(rows == expected for rows in positive_rows), positive_rows


def test_the_latent_pre_pass_never_runs_more_rows_than_sampling(spm_world):
    """Two latent membranes (and a calibrated one between them) ask the bare model about 1 + 2 prompts;
    sampling runs 2 rows per call. The pre-pass splits its rows into calls no larger than the sampling
    call ComfyUI sized for memory."""
    patcher, clip, _ = spm_world
    model = patcher
    for index, (membrane, transport) in enumerate((("snoopy.safetensors", "latent"), ("mickey_mouse.safetensors", "calibrated"),
                                                   ("van_gogh.safetensors", "latent"))):
        model = load_spm(model, clip, membrane, transport=transport, uid=str(index + 1))
    rows_per_call = []
    original = model.model.diffusion_model._forward

    def counting(x, *args, **kwargs):
        rows_per_call.append(x.shape[0])
        return original(x, *args, **kwargs)

    model.model.diffusion_model._forward = counting
    try:
        nodes.KSampler().sample(model, 1, 2, 5.0, "euler", "normal", encode(clip, "snoopy"), encode(clip, "fruit"),
                                {"samples": torch.zeros(1, 4, 8, 8)})
    finally:
        del model.model.diffusion_model._forward
    assert len(rows_per_call) > 4, "the pre-pass did not run"
    assert max(rows_per_call) == 2, rows_per_call


@pytest.fixture(scope="module")
def sdxl_world(tmp_path_factory):
    """The tiny SDXL model and its CLIP, with a random membrane for "snoopy" in a models/spm folder."""
    import folder_paths
    from membrane_helpers import key_map_of, modules_of, random_membrane
    from tiny_models import build_clip, build_patcher

    from spm_core.file_format import save_membrane

    folder = tmp_path_factory.mktemp("spm_sdxl")
    folder_paths.add_model_folder_path("spm", str(folder))
    with torch.no_grad():
        patcher, clip = build_patcher("sdxl", seed=7), build_clip("sdxl", seed=8)
        key_map = key_map_of(patcher)
        membrane = random_membrane(key_map, modules_of(patcher, key_map), seed=4, target="snoopy", std=0.15)
        membrane.architecture = "sdxl"
        save_membrane(str(folder / "snoopy_xl.safetensors"), membrane)
    return patcher, clip


def record_unet_calls(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(context, y) of every call that reaches the SDXL UNet, the latent pre-pass's included."""
    calls = []
    unet = model.model.diffusion_model
    original = unet._forward

    def recording(x, timesteps=None, context=None, y=None, *args, **kwargs):
        calls.append((context.clone(), y.clone()))
        return original(x, timesteps, context, y, *args, **kwargs)

    unet._forward = recording
    return calls


def test_sdxl_pre_pass_gives_each_row_its_own_pooled_vector(sdxl_world):
    """SDXL conditions on the prompt's pooled vector (the head of `y`). In the latent gate's pre-pass (its
    look-ahead, the concepts, the prompts) every row that carries a prompt carries that prompt's own
    pooled vector: the positive prompt its own, the empty prompt and the concept theirs, whatever the
    negative prompt is."""
    patcher, clip = sdxl_world
    model = load_spm(patcher, clip, "snoopy_xl.safetensors", transport="latent")
    calls = record_unet_calls(model)
    encode_node = pack_module("nodes.encode")
    empty, concept = encode_node.encode_concept(clip, ""), encode_node.encode_concept(clip, "snoopy")
    positive = encode(clip, "snoopy on a hill")
    own_pooled = {"empty": (empty.embedding, empty.pooled), "concept": (concept.embedding, concept.pooled),
                  "positive": (positive[0][0][0], positive[0][1]["pooled_output"][0])}
    try:
        for negative_text in ("blurry, lowres", "a bowl of fruit"):
            calls.clear()
            nodes.KSampler().sample(model, 1, 1, 5.0, "euler", "normal", positive, encode(clip, negative_text),
                                    {"samples": torch.zeros(1, 4, 8, 8)})
            seen = set()
            for context, y in calls:
                for row in range(context.shape[0]):
                    for name, (embedding, pooled) in own_pooled.items():
                        if torch.equal(context[row], embedding.to(context)):
                            seen.add(name)
                            assert torch.equal(y[row, : pooled.shape[0]], pooled.to(y)), f"{name} row with another pooled vector"
            assert seen == set(own_pooled), seen
    finally:
        del model.model.diffusion_model._forward


def test_img2img_latent_gate_is_measured_where_it_was_calibrated(spm_world, monkeypatch):
    """The latent gate's operating point holds at the start of text-to-image sampling (pure noise at the
    largest sigma). Runs that start from a picture at a lower sigma (img2img at any denoise) ask the bare
    model there too, so what it is asked does not depend on the picture or the denoise."""
    from test_compose import record_bare_predictions

    patcher, clip, _ = spm_world
    model = load_spm(patcher, clip, "snoopy.safetensors", transport="latent")
    predictions = record_bare_predictions(model, monkeypatch)
    positive, negative = encode(clip, "a bowl of fruit"), encode(clip, "blurry")
    asked = {}
    for denoise in (0.3, 0.5, 0.8):
        for picture_seed in (1, 2):
            picture = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(picture_seed))
            predictions.clear()
            nodes.KSampler().sample(model, 3, 4, 6.0, "euler", "normal", positive, negative, {"samples": picture},
                                    denoise=denoise)
            asked[(denoise, picture_seed)] = [p.clone() for p in predictions]
    first = asked[(0.3, 1)]
    assert len(first) == PRE_PASS_CALLS, "one pre-pass: look-ahead, concepts, conds"
    for answers in asked.values():
        assert all(torch.equal(a, b) for a, b in zip(answers, first))
