"""Membranes on Flux.1 (issue 17, first slice): a tiny Flux built from ComfyUI's own classes
(comfy.model_base.Flux around comfy.ldm.flux.model.Flux) and Flux's own text encoders (T5 XXL and
CLIP-L classes with the bundled tokenizers, tiny random weights).

What is checked: the layers a membrane binds (txt_in and the double blocks' text stream) read text
tokens only, batch first; gate 0 is the bare model bit for bit; gate 1 is ComfyUI's own LoRA
patching, and our Flux file loads in the stock LoraLoader; the token gate opens for prompts holding
the concept's words and stays shut otherwise; each row is gated by its own prompt under KSampler
at cfg 1 and under SamplerCustomAdvanced's BasicGuider (FluxGuidance, one row per prompt, no
negative); a UNet membrane on Flux, a Flux membrane on a UNet and a membrane of another text width
are refused naming the file and the model, with the incoming MODEL untouched."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from membrane_helpers import modules_of, random_membrane
from pack import load_spm, node, pack_module
from tiny_models import build_chroma_clip, build_chroma_patcher, build_clip, build_flux_clip, build_flux_patcher, build_patcher

from spm_core.concepts import Concept
from spm_core.file_format import is_text_token_layer, load_membrane, lora_tensors, save_membrane
from spm_core.stack import InstalledHooks, MembraneStack, MembraneUse

DEPTH, SINGLE_DEPTH = 2, 1  # double and single blocks of the tiny Flux (tiny_models.flux_config)
UNRELATED = "a bowl of fruit on a table"


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """The tiny Flux, its text encoders, its membrane layers and a models folder (spm + loras, the
    default ones while this module runs) holding a Flux membrane for "snoopy" and an SD1 membrane."""
    import folder_paths

    pack_module("nodes")  # the pack loaded the way ComfyUI loads it
    patcher, clip = build_flux_patcher(seed=3), build_flux_clip(seed=4)
    key_map = double_stream_layers(patcher)
    modules = modules_of(patcher, key_map)
    folder = tmp_path_factory.mktemp("flux_models")
    for kind in ("spm", "loras"):
        folder_paths.add_model_folder_path(kind, str(folder), is_default=True)
    membrane = dataclasses.replace(random_membrane(key_map, modules, seed=1, target="snoopy", std=0.3),
                                   architecture="flux")
    save_membrane(str(folder / "flux_snoopy.safetensors"), membrane)
    sd1 = build_patcher("sd1", seed=2)
    sd1_map, _ = pack_module("nodes.architectures").membrane_layers(sd1)
    save_membrane(str(folder / "sd1_snoopy.safetensors"), random_membrane(sd1_map, modules_of(sd1, sd1_map), seed=2))
    yield {"patcher": patcher, "clip": clip, "key_map": key_map, "modules": modules, "membrane": membrane,
           "folder": folder, "sd1": sd1}
    for kind in ("spm", "loras"):  # later test modules find their own folders where they left them
        folder_paths.folder_names_and_paths[kind][0].remove(str(folder))


def double_stream_layers(patcher) -> dict[str, str]:
    """The model's membrane layers but the single blocks' (a plain LoRA's update there would reach the image
    tokens too, so our single-block layers are not compared with ComfyUI's LoRA patching here: see
    tests/test_flux_single_blocks.py)."""
    key_map, _ = pack_module("nodes.architectures").membrane_layers(patcher)
    return {name: key for name, key in key_map.items() if not is_text_token_layer(name)}


def flux_inputs(batch: int = 2, tokens: int = 256, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 16, 8, 8, generator=generator), "timestep": torch.full((batch,), 0.7),
            "context": torch.randn(batch, tokens, 32, generator=generator),
            "y": torch.randn(batch, 32, generator=generator), "guidance": torch.full((batch,), 3.5)}


@pytest.fixture(autouse=True)
def _models_unloaded():
    """Each test starts from the models' own weights: a sampling test leaves its (possibly LoRA-patched)
    clone loaded, and ComfyUI patches the shared weights in place until it unloads it."""
    import comfy.model_management

    comfy.model_management.unload_all_models()


def predict(patcher, inputs: dict) -> torch.Tensor:
    return patcher.model.diffusion_model(**inputs)


def predict_with_lora(patcher, lora: dict, inputs: dict) -> torch.Tensor:
    """The prediction with `lora` (a file's tensors) patched into the weights by ComfyUI's own LoRA code."""
    import comfy.sd

    lora_patcher, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    lora_patcher.patch_model()
    try:
        return predict(lora_patcher, inputs)
    finally:
        lora_patcher.unpatch_model()


def hooked(flux, gates, inputs, membranes=None) -> torch.Tensor:
    membranes = membranes or [flux["membrane"]]
    shapes = {key: (m.weight.shape[0], m.weight.shape[1], False) for key, m in flux["modules"].items()}
    stack = MembraneStack([MembraneUse(m) for m in membranes], flux["key_map"], shapes)
    hooks = InstalledHooks(stack)
    hooks.install(flux["modules"])
    try:
        with stack.gates_active(torch.as_tensor(gates, dtype=torch.float32)):
            return predict(flux["patcher"], inputs)
    finally:
        hooks.remove()


def state_before(patcher) -> tuple:
    return (dict(patcher.attachments), {k: dict(v) for k, v in patcher.wrappers.items()}, dict(patcher.injections),
            dict(patcher.patches))


# --- binding


def test_membrane_layers_are_txt_in_the_double_blocks_text_stream_and_the_single_blocks(flux):
    key_map, _ = pack_module("nodes.architectures").membrane_layers(flux["patcher"])
    expected = {"diffusion_model.txt_in"} | {f"diffusion_model.double_blocks.{i}.{layer}" for i in range(DEPTH)
                                             for layer in ("txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")}
    single = {f"diffusion_model.single_blocks.{i}.{layer}" for i in range(SINGLE_DEPTH) for layer in ("linear1", "linear2")}
    assert set(key_map.values()) == expected | single
    assert set(flux["key_map"].values()) == expected
    assert key_map["lora_unet_double_blocks_1_txt_attn_qkv"] == "diffusion_model.double_blocks.1.txt_attn.qkv"
    assert key_map["lora_unet_single_blocks_0_linear2"] == "diffusion_model.single_blocks.0.linear2"
    assert len(key_map) == len(expected | single), "one file name per layer: the lora_unet_ (kohya / BFL) names"


def test_bound_layers_read_text_tokens_only_batch_first(flux):
    """Measured: every bound Linear sees (batch, text tokens, in) and nothing else, so a per-row gate
    applies as on a UNet and no image token passes through a membrane layer."""
    seen: dict[str, list[tuple[int, ...]]] = {}
    handles = [module.register_forward_hook(lambda m, args, out, key=key: seen.setdefault(key, []).append(tuple(args[0].shape)))
               for key, module in flux["modules"].items()]
    try:
        predict(flux["patcher"], flux_inputs(batch=3, tokens=40))
    finally:
        for handle in handles:
            handle.remove()
    assert set(seen) == set(flux["modules"])
    for key, shapes in seen.items():
        assert [shape[:2] for shape in shapes] == [(3, 40)], key  # 16 image tokens never reach these layers


def test_every_bound_layer_reaches_the_prediction(flux):
    """Measured: a membrane on any one bound layer alone changes the noise prediction (the last double
    block's text stream reaches the image through the single blocks), so no bound layer is dead."""
    inputs = flux_inputs()
    bare = predict(flux["patcher"], inputs)
    membrane = flux["membrane"]
    for name in sorted(membrane.layers):
        alone = dataclasses.replace(membrane, layers={name: membrane.layers[name]})
        change = (hooked(flux, [[1.0], [1.0]], inputs, membranes=[alone]) - bare).abs().max()
        assert change > 1e-5 * bare.abs().max(), name  # fp32 rounding is ~1e-7


# --- gate 0, gate 1, rows


def test_gate_zero_is_bit_identical_to_the_bare_model(flux):
    inputs = flux_inputs()
    assert torch.equal(hooked(flux, [[0.0], [0.0]], inputs), predict(flux["patcher"], inputs))


def test_gate_one_equals_comfyui_lora_patching_of_our_file(flux, caplog):
    import comfy.lora
    import comfy.utils

    path = flux["folder"] / "flux_snoopy.safetensors"
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    with caplog.at_level("WARNING"):
        patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(flux["patcher"].model, {}))
    assert "not loaded" not in caplog.text.lower()
    assert len(patches) == 1 + 4 * DEPTH
    inputs = flux_inputs()
    merged = predict_with_lora(flux["patcher"], lora, inputs)
    ours = hooked(flux, [[1.0], [1.0]], inputs, membranes=[load_membrane(str(path))])
    assert not torch.equal(merged, predict(flux["patcher"], inputs))
    assert (ours - merged).abs().max() <= 1e-5 * merged.abs().max()


def test_gates_apply_per_row(flux):
    inputs = flux_inputs(batch=3)
    together = hooked(flux, [[1.0], [0.0], [0.5]], inputs)
    bare = predict(flux["patcher"], inputs)
    assert torch.equal(together[1], bare[1])
    for row, gate in ((0, 1.0), (2, 0.5)):
        alone = hooked(flux, [[gate]] * 3, inputs)
        assert (together[row] - alone[row]).abs().max() <= 1e-5
        assert (together[row] - bare[row]).abs().max() > 1e-3


def test_our_flux_file_in_the_stock_lora_loader_equals_always_open(flux, caplog):
    """The stock LoraLoader (model and CLIP, from models/loras) reads every key of our Flux file and
    samples as SPM Load Membrane with always_open does."""
    import nodes

    patcher, clip = flux["patcher"], flux["clip"]
    positive, negative = encode(clip, "snoopy"), encode(clip, "")
    with caplog.at_level("WARNING"):
        lora_model, _ = nodes.LoraLoader().load_lora(patcher, clip, "flux_snoopy.safetensors", 1.0, 1.0)
    assert "not loaded" not in caplog.text.lower()
    membrane_model = load_spm(patcher, None, "flux_snoopy.safetensors", transport="always_open")
    by_lora, by_membrane = ksample(lora_model, positive, negative), ksample(membrane_model, positive, negative)
    assert not torch.equal(by_lora, ksample(patcher, positive, negative))
    assert (by_lora - by_membrane).abs().max() <= 1e-5 * by_lora.abs().max()


# Public Flux LoRA layouts of the text stream: (txt_in, per double block q, k, v (diffusers splits
# qkv), proj, mlp.0, mlp.2) -> layer path, the down/up suffixes, and whether alpha tensors are written.
PUBLIC_LAYOUTS = {
    "diffusers": (lambda i, kind: "transformer." + DIFFUSERS_PATHS[kind].format(i), (".lora_A.weight", ".lora_B.weight"), False),
    "onetrainer": (lambda i, kind: "lora_transformer_" + DIFFUSERS_PATHS[kind].format(i).replace(".", "_"),
                   (".lora_down.weight", ".lora_up.weight"), True),
    "bfl": (lambda i, kind: "diffusion_model." + BFL_PATHS[kind].format(i), (".lora_A.weight", ".lora_B.weight"), False),
}
DIFFUSERS_PATHS = {"txt_in": "context_embedder", "q": "transformer_blocks.{}.attn.add_q_proj",
                   "k": "transformer_blocks.{}.attn.add_k_proj", "v": "transformer_blocks.{}.attn.add_v_proj",
                   "proj": "transformer_blocks.{}.attn.to_add_out", "mlp0": "transformer_blocks.{}.ff_context.net.0.proj",
                   "mlp2": "transformer_blocks.{}.ff_context.net.2"}
BFL_PATHS = {"txt_in": "txt_in", "qkv": "double_blocks.{}.txt_attn.qkv", "proj": "double_blocks.{}.txt_attn.proj",
             "mlp0": "double_blocks.{}.txt_mlp.0", "mlp2": "double_blocks.{}.txt_mlp.2"}
SHAPES = {"txt_in": (32, 32), "q": (32, 32), "k": (32, 32), "v": (32, 32), "qkv": (96, 32), "proj": (32, 32),
          "mlp0": (64, 32), "mlp2": (32, 64)}


def public_layout_file(path, layout: str) -> None:
    """An erasure LoRA of the tiny Flux's text stream as another trainer writes it: block 0 gets q and
    k only (EraseAnything's choice), block 1 q, k and v at ranks 2, 1, 1; alphas (OneTrainer) of 1."""
    from safetensors.torch import save_file

    name_of, (down_suffix, up_suffix), alphas = PUBLIC_LAYOUTS[layout]
    split = layout != "bfl"
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    layers = [(None, "txt_in")] + [(i, kind) for i in range(DEPTH) for kind in
                                   ((("q", "k") if i == 0 else ("q", "k", "v")) if split else ("qkv",)) + ("proj", "mlp0", "mlp2")]
    for block, kind in layers:
        rank = 2 if (block, kind) == (1, "q") else 1
        out_features, in_features = SHAPES[kind]
        name = name_of(block, kind)
        tensors[name + down_suffix] = torch.randn(rank, in_features, generator=generator) * 0.3
        tensors[name + up_suffix] = torch.randn(out_features, rank, generator=generator) * 0.3
        if alphas:
            tensors[name + ".alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path), metadata={"prompts": "snoopy"})


@pytest.mark.parametrize("layout", sorted(PUBLIC_LAYOUTS))
def test_public_flux_layouts_load_and_equal_comfyui_lora_patching(flux, layout, tmp_path, caplog):
    """A Flux erasure LoRA in the diffusers (PEFT), OneTrainer or original BFL layout loads as a
    membrane on the kohya names (diffusers' q/k/v parts joined into qkv), and at gate 1 equals
    ComfyUI's own loading and patching of the same file: the name correspondences are ComfyUI's."""
    import comfy.utils

    path = tmp_path / f"{layout}.safetensors"
    public_layout_file(path, layout)
    membrane = load_membrane(str(path))
    assert membrane.architecture == "flux"
    assert set(membrane.layers) == set(flux["key_map"])
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    inputs = flux_inputs()
    with caplog.at_level("WARNING"):
        merged = predict_with_lora(flux["patcher"], lora, inputs)
    assert "not loaded" not in caplog.text.lower(), "ComfyUI reads every key of the file"
    ours = hooked(flux, [[1.0], [1.0]], inputs, membranes=[membrane])
    assert not torch.equal(merged, predict(flux["patcher"], inputs))
    assert (ours - merged).abs().max() <= 1e-5 * merged.abs().max()


def test_two_layouts_of_one_layer_in_one_file_are_refused(tmp_path):
    from safetensors.torch import save_file

    errors = pack_module("spm_core.errors")
    path = tmp_path / "twice.safetensors"
    save_file({"lora_unet_txt_in.lora_down.weight": torch.zeros(1, 32), "lora_unet_txt_in.lora_up.weight": torch.zeros(32, 1),
               "transformer.context_embedder.lora_A.weight": torch.zeros(1, 32),
               "transformer.context_embedder.lora_B.weight": torch.zeros(32, 1)}, str(path))
    with pytest.raises(errors.SPMFileError, match="twice.safetensors: layers lora_unet_txt_in and "
                                                  "transformer.context_embedder adapt the same layer lora_unet_txt_in"):
        pack_module("spm_core.file_format").load_membrane(str(path))


def test_save_as_lora_and_merge_into_model_work_on_flux(flux, caplog):
    """SPM Save as LoRA writes a Flux chain as one plain LoRA the stock loader reads completely, and
    SPM Merge into Model patches it into the weights: both equal the always-open membranes."""
    import comfy.lora
    import comfy.utils

    patcher, clip = flux["patcher"], flux["clip"]
    positive, negative = encode(clip, "snoopy"), encode(clip, "")
    model = load_spm(load_spm(patcher, None, "flux_snoopy.safetensors", transport="always_open", strength=0.5),
                     None, "flux_snoopy.safetensors", transport="always_open", strength=0.25)
    path = node("SPMSaveAsLoRA").execute(model, "flux_baked", overwrite=True).result[0]
    lora = comfy.utils.load_torch_file(path, safe_load=True)
    with caplog.at_level("WARNING"):
        patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(patcher.model, {}))
    assert "not loaded" not in caplog.text.lower() and len(patches) == 1 + 4 * DEPTH
    merged = node("SPMMergeIntoModel").execute(model).result[0]
    by_hooks, by_weights = ksample(model, positive, negative), ksample(merged, positive, negative)
    assert not torch.equal(by_hooks, ksample(patcher, positive, negative))
    assert (by_hooks - by_weights).abs().max() <= 1e-5 * by_hooks.abs().max()


# --- the token gate


def encode(clip, text: str) -> list:
    """CLIP Text Encode then FluxGuidance 3.5, as ComfyUI's Flux workflows condition."""
    from comfy_extras.nodes_flux import FluxGuidance

    import nodes

    (conditioning,) = nodes.CLIPTextEncode().encode(clip, text)
    return FluxGuidance.execute(conditioning, 3.5).result[0]


def token_transport(clip, *targets: str, **settings):
    """A tokens-mode Transport for one membrane per target, its concepts encoded in every case variant
    (spm_core.token_gate.case_variants) with their content-token positions (nodes.architectures.content_span)."""
    transport = pack_module("spm_core.transport")
    architectures = pack_module("nodes.architectures")
    variants = pack_module("spm_core.token_gate").case_variants

    def concept(text: str):
        tokens = clip.tokenize(text)
        return transport.ConceptEmbedding(embedding=clip.encode_from_tokens(tokens)[0].float(),
                                          content=architectures.content_span(clip, tokens))

    empty = clip.encode_from_tokens(clip.tokenize(""))[0].float()
    return transport.Transport([[concept(v) for v in variants(t)] for t in targets], transport.TransportMode.TOKENS,
                               empty=empty, **settings)


def test_content_span_is_where_the_words_sit(flux):
    architectures = pack_module("nodes.architectures")
    clip = flux["clip"]
    tokens = clip.tokenize("snoopy")
    t5 = [token[0] for token in tokens["t5xxl"][0]]
    start, stop = architectures.content_span(clip, tokens)
    assert start == 0 and t5[stop] == 1 and set(t5[stop + 1:]) == {0}, "T5: words first, then end (1) and padding (0)"
    sd1_clip = __import__("tiny_models").build_clip("sd1")
    assert architectures.content_span(sd1_clip, sd1_clip.tokenize("snoopy dog")) == (1, 3), "CLIP: after the start token"
    assert architectures.content_span(clip, clip.tokenize("")) is None, "the empty prompt has no words"


def test_token_gate_opens_for_the_concepts_words_and_stays_shut_otherwise(flux):
    clip = flux["clip"]
    transport = token_transport(clip, "snoopy", "van gogh")
    prompts = ["snoopy", "a photo of snoopy playing in the park", "a painting by van gogh", UNRELATED, ""]
    rows = torch.cat([clip.encode_from_tokens(clip.tokenize(p)).float() for p in prompts])
    gates = transport.gates(rows)
    expected = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    assert torch.equal(gates, expected), gates
    # T5 is case-sensitive ("Van Gogh" shares no token with "van gogh": gate 0 without the variants)
    for text, column in (("a painting by Van Gogh", 1), ("A PAINTING BY VAN GOGH", 1), ("Snoopy's house", 0)):
        assert transport.gates(clip.encode_from_tokens(clip.tokenize(text)).float())[0, column] == 1.0, text
    # where the words stand does not matter (the flattened cosine compares position by position)
    for text in ("snoopy, a red house, a red house, a red house", "a red house, a red house, a red house, snoopy"):
        assert transport.gates(clip.encode_from_tokens(clip.tokenize(text)).float())[0, 0] == 1.0, text


def test_the_flattened_cosine_does_not_tell_flux_prompts_apart(flux):
    """Why Flux needs the token gate: on 256-token T5 conditioning the paper's flattened cosine is
    dominated by padding and opens the membrane for every prompt."""
    transport = pack_module("spm_core.transport")
    clip = flux["clip"]
    tokens = clip.tokenize("snoopy")
    paper = transport.Transport([[transport.ConceptEmbedding(embedding=clip.encode_from_tokens(tokens)[0].float())]],
                                transport.TransportMode.PAPER)
    unrelated = clip.encode_from_tokens(clip.tokenize(UNRELATED)).float()
    assert paper.gates(unrelated)[0, 0] > 0.9
    assert token_transport(clip, "snoopy").gates(unrelated)[0, 0] == 0.0


def test_the_token_gate_is_refused_on_clip_unets(flux):
    """CLIP is causal: "snoopy" after "a photo of" is another vector than "snoopy" alone (the token
    gate gives it 0.06 on the tiny SD1 encoders, and 1.0 to "snoopy playing in the park"), so the
    token gate is refused on UNets, naming the file and the model."""
    sd1_clip = __import__("tiny_models").build_clip("sd1", seed=8)
    transport = token_transport(sd1_clip, "snoopy")

    def gate(text: str) -> float:
        return float(transport.gates(sd1_clip.encode_from_tokens(sd1_clip.tokenize(text)).float())[0, 0])

    assert gate("snoopy playing in the park") == 1.0 and gate("a photo of snoopy") == 0.0
    membrane = pack_module("spm_core.file_format").load_membrane(str(flux["folder"] / "sd1_snoopy.safetensors"))
    with pytest.raises(pack_module("spm_core.errors").SPMError,
                       match=r"sd1_snoopy.safetensors: transport 'tokens' .* and SD15's CLIP is causal"):
        pack_module("nodes.architectures").check_membrane_fits(flux["sd1"], membrane, transport)


def test_token_gate_refuses_what_it_cannot_compare(flux):
    transport = pack_module("spm_core.transport")
    errors = pack_module("spm_core.errors")
    clip = flux["clip"]
    embedding = clip.encode_from_tokens(clip.tokenize("snoopy"))[0].float()
    empty = clip.encode_from_tokens(clip.tokenize(""))[0].float()
    with pytest.raises(errors.SPMError, match="needs the positions of each concept's content tokens"):
        transport.Transport([[transport.ConceptEmbedding(embedding=embedding)]], transport.TransportMode.TOKENS, empty=empty)
    with pytest.raises(errors.SPMError, match="needs the empty prompt's embedding"):
        transport.Transport([[transport.ConceptEmbedding(embedding=embedding, content=(0, 5))]],
                            transport.TransportMode.TOKENS)
    with pytest.raises(errors.SPMError, match="threshold < saturation"):
        token_transport(clip, "snoopy", token_threshold=0.9, token_saturation=0.2)
    with pytest.raises(errors.SPMError, match="prompt embeddings are 48 wide but the concept embeddings 32"):
        token_transport(clip, "snoopy").gates(torch.randn(1, 256, 48))


# --- per-row gates under Flux's guiders


class CallSpy:
    """A DIFFUSION_MODEL wrapper recording, per model call, the gates the stack applies, the output
    and the same call with every gate closed."""

    def __init__(self, stack):
        self.stack, self.calls = stack, []

    def __call__(self, executor, *args, **kwargs):
        gates = self.stack.current_row_gates()
        out = executor(*args, **kwargs)
        with self.stack.gates_active(torch.zeros(1, self.stack.membrane_count)):
            bare = executor(*args, **kwargs)
        self.calls.append({"gates": None if gates is None else gates.clone(), "out": out.clone(), "bare": bare.clone()})
        return out


def gated_model(flux, spy_key: str = "test_flux_spy", patcher=None, clip=None):
    """The tiny Flux (or `patcher`, gated with `clip`) with the "snoopy" membrane on the tokens gate, and
    a spy on its model calls."""
    from comfy.patcher_extension import WrappersMP

    runtime = pack_module("nodes.runtime")
    entry = runtime.MembraneEntry(membrane=pack_module("spm_core.file_format").load_membrane(
        str(flux["folder"] / "flux_snoopy.safetensors")), strength=1.0,
        transport=token_transport(clip or flux["clip"], "snoopy"))
    model = runtime.with_membrane(patcher or flux["patcher"], entry)
    spy = CallSpy(model.get_attachment(runtime.KEY).stack)
    model = model.clone()
    model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, spy_key, spy)
    return model, spy


def ksample(model, positive, negative, cfg: float = 1.0, steps: int = 2) -> torch.Tensor:
    import nodes

    (latent,) = nodes.EmptyLatentImage().generate(64, 64, 1)
    (out,) = nodes.KSampler().sample(model, 5, steps, cfg, "euler", "simple", positive, negative, latent)
    return out["samples"]


def basic_guider_sample(model, conditioning, steps: int = 2) -> torch.Tensor:
    """SamplerCustomAdvanced with BasicGuider (one cond, no CFG), as ComfyUI's Flux template samples."""
    from comfy_extras.nodes_custom_sampler import BasicGuider, BasicScheduler, KSamplerSelect, RandomNoise, SamplerCustomAdvanced

    import nodes

    guider = BasicGuider.execute(model, conditioning).result[0]
    sampler = KSamplerSelect.execute("euler").result[0]
    sigmas = BasicScheduler.execute(model, "simple", steps, 1.0).result[0]
    noise = RandomNoise.execute(5).result[0]
    (latent,) = nodes.EmptyLatentImage().generate(64, 64, 1)
    return SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent).result[0]["samples"]


def assert_rows_gated_by_their_own_prompt(spy, rows: int = 2, steps: int = 2, batched: bool = True) -> None:
    """Each step evaluated `rows` prompts, one row each (in one batch when `batched`: prompts of one
    length); exactly one of them (the concept's prompt) opened, and closed rows equal the bare model
    exactly."""
    assert spy.calls, "the sampler never called the model"
    for call in spy.calls:  # no gate context: every row of the call closed (the stack's early exit)
        call["gates"] = torch.zeros(call["out"].shape[0], 1) if call["gates"] is None else call["gates"]
    seen = torch.cat([call["gates"][:, 0] for call in spy.calls])
    assert len(seen) == rows * steps and sorted(seen.tolist()) == [0.0] * ((rows - 1) * steps) + [1.0] * steps
    for call in spy.calls:
        gates = call["gates"]
        if batched:
            assert gates.shape[0] == rows, "one batch, one row per prompt"
        for row in range(gates.shape[0]):
            if gates[row, 0] == 0.0:
                assert torch.equal(call["out"][row], call["bare"][row]), "a closed row must equal the bare model exactly"
            else:
                assert not torch.equal(call["out"][row], call["bare"][row])


def test_rows_are_gated_by_their_own_prompt_under_ksampler_at_cfg_1(flux):
    import nodes

    clip = flux["clip"]
    model, spy = gated_model(flux)
    (positive,) = nodes.ConditioningCombine().combine(encode(clip, "a photo of snoopy"), encode(clip, UNRELATED))
    ksample(model, positive, encode(clip, ""))
    assert_rows_gated_by_their_own_prompt(spy)


def test_rows_are_gated_by_their_own_prompt_under_basic_guider(flux):
    import nodes

    clip = flux["clip"]
    model, spy = gated_model(flux)
    (positive,) = nodes.ConditioningCombine().combine(encode(clip, UNRELATED), encode(clip, "snoopy in the snow"))
    basic_guider_sample(model, positive)
    assert_rows_gated_by_their_own_prompt(spy)


def test_rows_are_gated_by_their_own_prompt_with_a_negative_at_cfg_2(flux):
    """A CFG'd run (a negative row, as de-distilled Flux or CFG'd DiTs sample): the negative row names
    the concept but stays closed, since the membrane acts on positive rows only."""
    import nodes

    clip = flux["clip"]
    model, spy = gated_model(flux)
    (positive,) = nodes.ConditioningCombine().combine(encode(clip, "snoopy on a roof"), encode(clip, UNRELATED))
    ksample(model, positive, encode(clip, "snoopy"), cfg=2.0)
    assert_rows_gated_by_their_own_prompt(spy, rows=3)


def test_an_unrelated_prompt_samples_exactly_as_the_bare_model(flux):
    clip = flux["clip"]
    model, _ = gated_model(flux)
    unrelated = encode(clip, UNRELATED)
    assert torch.equal(basic_guider_sample(model, unrelated), basic_guider_sample(flux["patcher"], unrelated))
    snoopy = encode(clip, "snoopy")
    assert not torch.equal(basic_guider_sample(model, snoopy), basic_guider_sample(flux["patcher"], snoopy))


# --- refusals


def test_a_unet_membrane_on_flux_and_a_flux_membrane_on_a_unet_are_refused(flux):
    errors = pack_module("spm_core.errors")
    for model, name in ((flux["patcher"], "sd1_snoopy.safetensors"), (flux["sd1"], "flux_snoopy.safetensors")):
        before = state_before(model)
        with pytest.raises(errors.SPMModelMismatch) as caught:
            load_spm(model, None, name, transport="always_open")
        assert name in str(caught.value), str(caught.value)
        assert state_before(model) == before


def test_fit_check_names_the_file_and_the_model(flux):
    architectures = pack_module("nodes.architectures")
    errors = pack_module("spm_core.errors")
    file_format = pack_module("spm_core.file_format")
    folder = flux["folder"]
    flux_membrane = file_format.load_membrane(str(folder / "flux_snoopy.safetensors"))
    sd1_membrane = file_format.load_membrane(str(folder / "sd1_snoopy.safetensors"))
    with pytest.raises(errors.SPMModelMismatch, match=r"sd1_snoopy.safetensors is a Stable Diffusion UNet membrane "
                                                      r"\(sd1\) and the model is Flux, a Flux"):
        architectures.check_membrane_fits(flux["patcher"], sd1_membrane)
    with pytest.raises(errors.SPMModelMismatch, match=r"flux_snoopy.safetensors is a Flux membrane \(flux\) and the "
                                                      r"model is SD15"):
        architectures.check_membrane_fits(flux["sd1"], flux_membrane)
    wide = build_flux_patcher(seed=5, text_width=48)  # a Flux reading 48-wide text
    with pytest.raises(errors.SPMModelMismatch, match=r"flux_snoopy.safetensors reads 32-wide text \(its txt_in layer\) "
                                                      r"but Flux reads 48-wide text"):
        architectures.check_membrane_fits(wide, flux_membrane)
    with pytest.raises(errors.SPMModelMismatch, match=r"flux_snoopy.safetensors: the text encoder gives 32-wide "
                                                      r"embeddings but Flux reads 48-wide text"):
        architectures.check_membrane_fits(wide, dataclasses.replace(flux_membrane, layers={
            k: v for k, v in flux_membrane.layers.items() if k != "lora_unet_txt_in"}), token_transport(flux["clip"], "snoopy"))
    transport = pack_module("spm_core.transport")
    tokens = flux["clip"].tokenize("snoopy")
    paper = transport.Transport([[transport.ConceptEmbedding(embedding=flux["clip"].encode_from_tokens(tokens)[0].float())]],
                                transport.TransportMode.PAPER)
    with pytest.raises(errors.SPMError, match=r"flux_snoopy.safetensors: transport 'paper' compares whole flattened "
                                              r"prompts, which does not tell Flux's T5 prompts apart .* Choose 'tokens'"):
        architectures.check_membrane_fits(flux["patcher"], flux_membrane, paper)
    architectures.check_membrane_fits(flux["patcher"], flux_membrane, token_transport(flux["clip"], "snoopy"))  # fits


def test_a_membrane_of_another_text_width_is_refused_on_load(flux):
    errors = pack_module("spm_core.errors")
    wide = build_flux_patcher(seed=5, text_width=48)
    before = state_before(wide)
    with pytest.raises(errors.SPMModelMismatch) as caught:
        load_spm(wide, None, "flux_snoopy.safetensors", transport="always_open")
    # the shape check names the txt_in layer's 32 x 48 mismatch; the fit check (once SPM Load Membrane
    # runs it) the 32- and 48-wide text
    assert "flux_snoopy.safetensors" in str(caught.value) and "48" in str(caught.value), str(caught.value)
    assert state_before(wide) == before


def test_a_flux_lora_of_single_blocks_is_refused_with_the_reason(flux, tmp_path):
    from safetensors.torch import save_file

    errors = pack_module("spm_core.errors")
    path = tmp_path / "single.safetensors"
    save_file({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(1, 32),
               "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(224, 1),
               "lora_unet_txt_in.lora_down.weight": torch.zeros(1, 32),
               "lora_unet_txt_in.lora_up.weight": torch.zeros(32, 1)}, str(path))
    with pytest.raises(errors.SPMFileError, match="single.safetensors: not an SPM membrane: it adapts Flux layers that "
                                                  "membranes do not use as it does: the image stream, or single blocks "
                                                  r".* on every token, where a membrane adapts them on the text tokens "
                                                  r"only \(files made so say it in their metadata, single_blocks=text_tokens\)"):
        pack_module("spm_core.file_format").load_membrane(str(path))
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(1, 32),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 1),
               "transformer.context_embedder.lora_A.weight": torch.zeros(1, 32),
               "transformer.context_embedder.lora_B.weight": torch.zeros(32, 1)}, str(path))
    with pytest.raises(errors.SPMFileError, match="it adapts Flux layers that membranes do not use as it does"):
        pack_module("spm_core.file_format").load_membrane(str(path))


def test_a_kohya_style_flux_file_loads_as_a_flux_membrane(flux, tmp_path):
    """The public SPM metadata only (`prompts`) on kohya Flux LoRA keys: the architecture comes from
    the layer names."""
    from safetensors.torch import save_file

    path = tmp_path / "kohya_style.safetensors"
    save_file(lora_tensors(flux["membrane"]), str(path), metadata={"prompts": "snoopy"})
    loaded = load_membrane(str(path))
    assert loaded.architecture == "flux" and loaded.concepts == (Concept("snoopy"),)
    assert set(loaded.layers) == set(flux["key_map"])
    assert all(torch.equal(loaded.layers[k].up, flux["membrane"].layers[k].up) for k in loaded.layers)


OTHER_MODELS = {  # diffusion transformers whose text enters elsewhere: refused by name (issue 17: SD3 "otherwise a clear refusal")
    "Flux2": {"image_model": "flux2", "in_channels": 16, "out_channels": 16, "vec_in_dim": None, "context_in_dim": 32,
              "hidden_size": 32, "mlp_ratio": 3.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
              "axes_dim": [4, 4, 4, 4], "theta": 2000, "patch_size": 1, "qkv_bias": False, "guidance_embed": True,
              "global_modulation": True, "mlp_silu_act": True, "ops_bias": False},
    "SD3": {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "adm_in_channels": 32,
            "pos_embed_scaling_factor": None, "num_patches": 64, "pos_embed_max_size": 8,
            "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}}},
}


@pytest.mark.parametrize("name", sorted(OTHER_MODELS))
def test_a_model_that_takes_no_membranes_is_named(flux, name):
    import types

    import comfy.supported_models

    model = getattr(comfy.supported_models, name)(dict(OTHER_MODELS[name])).get_model({}, device="meta")
    with pytest.raises(pack_module("spm_core.errors").SPMModelMismatch, match=rf"{name} \({name}\) takes no membranes"):
        pack_module("nodes.architectures").membrane_layers(types.SimpleNamespace(model=model))


def test_full_size_flux_dev_layout(flux):
    """Flux.1-dev as ComfyUI's model detection configures it (meta device): 77 membrane layers of the
    expected shapes where the text enters, 76 in the single blocks; a rank-1 membrane on the first has
    941,056 parameters (3.8 MB in fp32), on all of them 2,575,360 (10.3 MB)."""
    import types

    import comfy.supported_models

    config = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
              "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
              "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
    model = comfy.supported_models.Flux(config).get_model({}, device="meta")
    key_map, shapes = pack_module("nodes.architectures").membrane_layers(types.SimpleNamespace(model=model))
    assert len(key_map) == 1 + 4 * 19 + 2 * 38
    expected = {"txt_attn.qkv": (9216, 3072), "txt_attn.proj": (3072, 3072), "txt_mlp.0": (12288, 3072),
                "txt_mlp.2": (3072, 12288), "linear1": (3072 * 3 + 12288, 3072), "linear2": (3072, 3072 + 12288)}
    for name, key in key_map.items():
        out_features, in_features, conv = shapes[key]
        assert not conv
        wanted = (3072, 4096) if name == "lora_unet_txt_in" else expected[key.split(".", 3)[3]]
        assert (out_features, in_features) == wanted, key
    sizes = {key: out_features + in_features for key, (out_features, in_features, _) in shapes.items()}
    assert sum(size for key, size in sizes.items() if ".single_blocks." not in key) == 941_056
    assert sum(sizes.values()) == 2_575_360


# --- Chroma: Flux.1's blocks, T5 text without padding, sampled with CFG


@pytest.fixture(scope="module")
def chroma(flux):
    patcher = build_chroma_patcher(seed=6)
    key_map = double_stream_layers(patcher)
    return {**flux, "patcher": patcher, "clip": build_chroma_clip(seed=7), "key_map": key_map,
            "modules": modules_of(patcher, key_map)}


def chroma_inputs(batch: int = 2) -> dict:
    inputs = flux_inputs(batch=batch, tokens=12)
    return {k: v for k, v in inputs.items() if k != "y"}


def test_chroma_binds_like_flux_and_gate_one_equals_comfyui_lora_patching(chroma):
    import comfy.utils

    assert set(chroma["key_map"]) == set(chroma["membrane"].layers), "the same layers under the same names"
    inputs = chroma_inputs()
    bare = predict(chroma["patcher"], inputs)
    assert torch.equal(hooked(chroma, [[0.0], [0.0]], inputs), bare)
    lora = comfy.utils.load_torch_file(str(chroma["folder"] / "flux_snoopy.safetensors"), safe_load=True)
    merged = predict_with_lora(chroma["patcher"], lora, inputs)
    assert not torch.equal(merged, bare)
    assert (hooked(chroma, [[1.0], [1.0]], inputs) - merged).abs().max() <= 1e-5 * merged.abs().max()


def test_chroma_token_gate_and_rows_under_cfg(chroma):
    """Chroma's T5 prompts are not padded (each its own length, so context moves a word's vectors more
    than in Flux's 256 padded tokens: on these encoders prompts naming the concept score 0.49-1.0,
    unrelated ones 0-0.46): the token gate orders them, and a CFG'd KSampler run gates each row by
    its own prompt."""
    import nodes

    clip = chroma["clip"]
    transport = token_transport(clip, "snoopy")

    def gate(text: str) -> float:
        return float(transport.gates(clip.encode_from_tokens(clip.tokenize(text)).float())[0, 0])

    assert gate("snoopy") == 1.0 and gate(UNRELATED) == 0.0 and gate("") == 0.0
    assert min(gate(t) for t in ("a photo of Snoopy", "snoopy playing in the park")) > max(
        gate(t) for t in ("a dog", "a red house", "a city street at night"))
    model, spy = gated_model(chroma, patcher=chroma["patcher"], clip=clip)

    def encode_chroma(text: str) -> list:
        return nodes.CLIPTextEncode().encode(clip, text)[0]

    (positive,) = nodes.ConditioningCombine().combine(encode_chroma("snoopy"), encode_chroma(UNRELATED))
    ksample(model, positive, encode_chroma("snoopy"), cfg=3.0)
    assert_rows_gated_by_their_own_prompt(spy, rows=3, batched=False)  # ComfyUI batches equal lengths only


def test_node_tokens_transport_gates_rows_under_basic_guider(flux):
    """SPM Load Membrane with transport tokens on Flux: each row of a two-prompt conditioning gated by its
    own prompt (the concept's case variants encoded by the node) under SamplerCustomAdvanced's BasicGuider."""
    from comfy.patcher_extension import WrappersMP

    import nodes

    clip = flux["clip"]
    model = load_spm(flux["patcher"], clip, "flux_snoopy.safetensors", transport="tokens")
    spy = CallSpy(model.get_attachment(pack_module("nodes.runtime").KEY).stack)
    model = model.clone()
    model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "spy", spy)
    (positive,) = nodes.ConditioningCombine().combine(encode(clip, UNRELATED), encode(clip, "Snoopy in the snow"))
    basic_guider_sample(model, positive)
    assert_rows_gated_by_their_own_prompt(spy)


def test_node_refusals_name_file_and_model(flux):
    """SPM Load Membrane refuses a membrane of another family, text width or a gate that cannot work on
    Flux, naming the file and the model, and leaves the incoming MODEL as it was."""
    errors = pack_module("spm_core.errors")
    cases = [
        (flux["patcher"], None, "sd1_snoopy.safetensors", "always_open",
         "is a Stable Diffusion UNet membrane (sd1) and the model is Flux"),
        (flux["sd1"], None, "flux_snoopy.safetensors", "always_open", "is a Flux membrane (flux) and the model is SD15"),
        (build_flux_patcher(seed=5, text_width=48), None, "flux_snoopy.safetensors", "always_open",
         "reads 32-wide text (its txt_in layer) but Flux reads 48-wide"),
        (flux["patcher"], build_clip("sd1", width=48), "flux_snoopy.safetensors", "tokens",
         "the text encoder gives 48-wide embeddings but Flux reads 32-wide"),
        (flux["patcher"], flux["clip"], "flux_snoopy.safetensors", "paper", "compares whole flattened prompts"),
    ]
    for model, clip, name, transport, phrase in cases:
        before = state_before(model)
        with pytest.raises(errors.SPMError) as caught:
            load_spm(model, clip, name, transport=transport)
        assert name in str(caught.value) and phrase in str(caught.value), str(caught.value)
        assert state_before(model) == before


def test_t5_prompt_words_exclude_the_bare_word_boundary_piece(chroma):
    """T5's SentencePiece writes "a house" as "▁", "a", "▁house": the bare "▁" is in nearly every prompt,
    so counted as a word it made the paper's token-overlap gate see "a snowman" in "a house"."""
    encode = pack_module("nodes.encode")
    clip = chroma["clip"]

    def words(text: str) -> frozenset[int]:
        return encode.token_ids(clip, clip.tokenize(text))

    assert words("a snowman") & words("a house") == words("a") and len(words("a")) == 1
    assert words("snowman") <= words("a snowman in the snow")
    boundary = [i for i, piece in clip.tokenizer.clip_t5xxl.inv_vocab.items() if piece == encode.WORD_BOUNDARY]
    assert boundary and boundary[0] in {t[0] for t in clip.tokenize("a house")["t5xxl"][0]}, "the case this guards"
