"""The membrane file format (docs/architecture.md, "Files"; bad input refused by name) against real files and a real ComfyUI host.

Files are written here with safetensors directly, in the shapes of tiny models built from
ComfyUI's own classes, so the layer names are the ones ComfyUI's LoRA key map really has.
"""

import json
import logging
import os
import pickle
import random

import comfy.lora
import comfy.utils
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import build_patcher

from spm_core import file_format
from spm_core.concepts import MAX_CONCEPTS, Concept
from spm_core.errors import SPMError, SPMFileError, SPMModelMismatch
from spm_core.file_format import DIFFUSERS_LAYER, infer_architecture, load_membrane, save_membrane
from spm_core.membrane import LayerWeights, Membrane
from spm_core.stack import bind_membrane, module_shape

PUBLIC_METADATA = {"prompts": "snoopy, mickey", "rank": "1", "alpha": "1.0"}
CONV_LAYERS = ("proj_in", "proj_out")


# --------------------------------------------------------------------------------------------
# tiny models and helpers that write files


class TinyModel:
    """A tiny UNet, its ComfyUI LoRA key map, and the shapes of its SPM layers."""

    def __init__(self, arch, context):
        self.arch = arch
        self.patcher = build_patcher(arch, context=context)
        self.key_map = comfy.lora.model_lora_keys_unet(self.patcher.model, {})
        self.layer_names = sorted(name for name in self.key_map if DIFFUSERS_LAYER.match(name))
        self.state_dict = self.patcher.model.state_dict()
        # file layer name -> weight shape in the model (4-D for 1x1 convs)
        self.weight_shapes = {name: tuple(self.state_dict[self.key_map[name]].shape) for name in self.layer_names}
        membrane_keys = {self.key_map[name] for name in self.layer_names}
        self.module_shapes = {}
        for path, module in self.patcher.model.diffusion_model.named_modules():
            key = f"diffusion_model.{path}.weight"
            if key in membrane_keys:
                self.module_shapes[key] = module_shape(module)


@pytest.fixture(scope="module")
def sd1():
    """Tiny SD1.x UNet with the real SD1 cross-attention width (768), so shapes say 'sd1'."""
    return TinyModel("sd1", context=768)


@pytest.fixture(scope="module")
def sdxl():
    """Tiny SDXL UNet with the real SDXL cross-attention width (2048)."""
    return TinyModel("sdxl", context=2048)


def lora_tensors(weight_shapes, rank=1, alpha=1.0, seed=0, dtype=torch.float32, with_alpha=True):
    """Public-SPM / kohya tensors for every layer: conv layers get (r, in, 1, 1) / (out, r, 1, 1)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in weight_shapes.items():
        out_features, in_features = shape[0], shape[1]
        down = torch.randn(rank, in_features, generator=generator)
        up = torch.randn(out_features, rank, generator=generator)
        if len(shape) == 4:
            down, up = down[:, :, None, None], up[:, :, None, None]
        tensors[name + ".lora_down.weight"] = down.to(dtype).contiguous()
        tensors[name + ".lora_up.weight"] = up.to(dtype).contiguous()
        if with_alpha:
            tensors[name + ".alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return tensors


def write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


def write_public(path, model, metadata=PUBLIC_METADATA, rank=1, alpha=1.0, **kwargs):
    return write(path, lora_tensors(model.weight_shapes, rank=rank, alpha=alpha, **kwargs), dict(metadata))


def expect_file_error(path, *phrases):
    """load_membrane(path) must raise SPMFileError naming the file (once) and each phrase."""
    with pytest.raises(SPMFileError) as caught:
        load_membrane(path)
    message = str(caught.value)
    assert message.count(str(path)) == 1, message
    for phrase in phrases:
        assert phrase.lower() in message.lower(), f"{phrase!r} not in {message!r}"
    assert caught.value.path == str(path)
    return message


def some_layer(model, suffix):
    return next(name for name in model.layer_names if name.endswith(suffix))


# --------------------------------------------------------------------------------------------
# 1. the public SPM files are read unchanged


@pytest.mark.parametrize("rank, alpha, scale", [(1, "1.0", 1.0), (4, "1.0", 0.25), (2, "4", 2.0)])
def test_public_spm_file_is_read_unchanged(tmp_path, sd1, rank, alpha, scale):
    metadata = {"prompts": "snoopy, mickey", "rank": str(rank), "alpha": alpha}
    tensors = lora_tensors(sd1.weight_shapes, rank=rank, alpha=float(alpha), seed=3)
    path = write(tmp_path / "snoopy_mickey.safetensors", tensors, metadata)

    membrane = load_membrane(path)

    assert [c.target for c in membrane.concepts] == ["snoopy", "mickey"]
    assert all(c.surrogate is None and c.neutral is None and c.aliases == () for c in membrane.concepts)
    assert membrane.rank == rank
    assert membrane.architecture == "sd1"
    assert membrane.name == "snoopy_mickey"
    assert membrane.metadata["source"] == "snoopy_mickey.safetensors"
    assert sorted(membrane.layers) == sd1.layer_names
    for name, layer in membrane.layers.items():
        is_conv = name.endswith(CONV_LAYERS)
        assert layer.conv is is_conv, name
        assert layer.scale == pytest.approx(scale), name
        # weights come back as (rank, in) / (out, rank) fp32 matrices, values untouched
        out_features, in_features = sd1.weight_shapes[name][:2]
        assert layer.down.shape == (rank, in_features) and layer.up.shape == (out_features, rank)
        assert layer.down.dtype == torch.float32
        assert torch.equal(layer.down, tensors[name + ".lora_down.weight"].reshape(rank, in_features))
        assert torch.equal(layer.up, tensors[name + ".lora_up.weight"].reshape(out_features, rank))
    assert sum(layer.conv for layer in membrane.layers.values()) == 2 * 7  # 7 transformers, proj_in + proj_out


def test_public_file_prompts_odd_spacing_and_empty_parts(tmp_path, sd1):
    path = write_public(tmp_path / "p.safetensors", sd1, {"prompts": " van gogh ,, picasso,", "rank": "1"})
    assert [c.target for c in load_membrane(path).concepts] == ["van gogh", "picasso"]


@pytest.mark.parametrize("width, arch", [(768, "sd1"), (1024, "sd2"), (2048, "sdxl")])
def test_infer_architecture_from_cross_attention_width(width, arch):
    def lw(in_features, out_features=320):
        return LayerWeights(down=torch.zeros(1, in_features), up=torch.zeros(out_features, 1), alpha=1.0)

    block = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_"
    layers = {block + "attn1_to_k": lw(320), block + "attn2_to_q": lw(320), block + "attn2_to_k": lw(width)}
    assert infer_architecture(layers) == arch
    only_v = {block + "attn1_to_q": lw(640), block + "attn2_to_v": lw(width)}
    assert infer_architecture(only_v) == arch


def test_infer_architecture_unknown():
    block = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_"
    self_attention_only = {block + "attn1_to_k": LayerWeights(torch.zeros(1, 768), torch.zeros(320, 1), 1.0)}
    assert infer_architecture(self_attention_only) is None
    odd_width = {block + "attn2_to_k": LayerWeights(torch.zeros(1, 512), torch.zeros(320, 1), 1.0)}
    assert infer_architecture(odd_width) is None


@pytest.mark.parametrize("width, arch", [(1024, "sd2"), (2048, "sdxl"), (32, "unknown")])
def test_file_architecture_inferred_from_shapes(tmp_path, width, arch):
    block = "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_"
    shapes = {block + "attn2_to_k": (640, width), block + "attn2_to_v": (640, width), block + "attn2_to_q": (640, 640)}
    path = write(tmp_path / f"w{width}.safetensors", lora_tensors(shapes), dict(PUBLIC_METADATA))
    assert load_membrane(path).architecture == arch


# --------------------------------------------------------------------------------------------
# 2. kohya / LECO style LoRAs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kohya_rank4_without_metadata_or_alpha(tmp_path, sd1, dtype):
    tensors = lora_tensors(sd1.weight_shapes, rank=4, dtype=dtype, with_alpha=False, seed=5)
    assert not any(key.endswith(".alpha") for key in tensors)
    path = write(tmp_path / "leco_rank4.safetensors", tensors)

    membrane = load_membrane(path)

    assert membrane.concepts == ()
    assert membrane.rank == 4
    assert membrane.architecture == "sd1"
    assert sorted(membrane.layers) == sd1.layer_names
    for name, layer in membrane.layers.items():
        assert layer.alpha == 4.0 and layer.scale == 1.0, name
        assert layer.down.dtype == torch.float32
        assert torch.equal(layer.up, tensors[name + ".lora_up.weight"].float().reshape(layer.up.shape))


def test_kohya_training_metadata_is_ignored(tmp_path, sd1):
    metadata = {"ss_network_dim": "4", "ss_network_alpha": "2", "ss_base_model_version": "sd_v1"}
    path = write_public(tmp_path / "kohya.safetensors", sd1, metadata, rank=4, alpha=2.0)
    membrane = load_membrane(path)
    assert membrane.concepts == ()
    assert {layer.scale for layer in membrane.layers.values()} == {0.5}


# --------------------------------------------------------------------------------------------
# 3. our own format: save then load gives back everything


ODD_CONCEPTS = (
    Concept("snoopy", aliases=("peanuts dog", "Snoopy the beagle")),
    Concept("Pokémon, Pikachu ⚡", surrogate="a yellow cartoon mouse"),
    Concept("千と千尋の神隠し", neutral="an anime film"),
    Concept("wonder woman", surrogate="gal gadot", neutral="a woman", aliases=("diana prince",)),
)


def random_membrane(model, concepts=ODD_CONCEPTS, rank=2, seed=11, per_layer_alpha=False, metadata=None):
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for index, (name, shape) in enumerate(model.weight_shapes.items()):
        alpha = 0.5 + index if per_layer_alpha else 1.0
        layers[name] = LayerWeights(down=torch.randn(rank, shape[1], generator=generator),
                                    up=torch.randn(shape[0], rank, generator=generator),
                                    alpha=alpha, conv=len(shape) == 4)
    return Membrane(name="made", concepts=concepts, layers=layers, architecture=model.arch, metadata=metadata or {})


BASE_MODEL = {"name": "tiny-sd1 ✓", "sha256": "0123abcd" * 8}
TRAINING = {"iterations": 3000, "lr": 1e-4, "rank": 2, "anchor": {"lambda": 1000.0, "sampler": "token-embeddings"},
            "prompts": ["Pokémon, Pikachu ⚡", "千と千尋の神隠し"], "fp32": True, "note": None}


def assert_same_layers(loaded, original):
    assert sorted(loaded.layers) == sorted(original.layers)
    for name, layer in original.layers.items():
        back = loaded.layers[name]
        assert torch.equal(back.down, layer.down), name
        assert torch.equal(back.up, layer.up), name
        assert back.alpha == layer.alpha and back.conv is layer.conv, name


def test_round_trip(tmp_path, sd1):
    original = random_membrane(sd1)
    path = str(tmp_path / "ours.safetensors")
    save_membrane(path, original, base_model=BASE_MODEL, training=TRAINING)

    loaded = load_membrane(path)

    assert_same_layers(loaded, original)
    assert loaded.concepts == ODD_CONCEPTS
    assert loaded.concepts[1].target == "Pokémon, Pikachu ⚡"  # the comma did not split the concept
    assert loaded.architecture == "sd1"
    assert loaded.rank == 2
    assert loaded.metadata["base_model"] == BASE_MODEL
    assert loaded.metadata["training"] == TRAINING
    assert loaded.metadata["spm_format"] == file_format.FORMAT_VERSION
    assert loaded.metadata["source"] == "ours.safetensors"
    assert loaded.concept_labels == ["snoopy", "Pokémon, Pikachu ⚡ → a yellow cartoon mouse", "千と千尋の神隠し",
                                     "wonder woman → gal gadot"]


def test_round_trip_keeps_metadata_from_membrane(tmp_path, sd1):
    original = random_membrane(sd1, metadata={"base_model": BASE_MODEL, "training": TRAINING})
    path = str(tmp_path / "again.safetensors")
    save_membrane(path, original)
    loaded = load_membrane(path)
    assert loaded.metadata["base_model"] == BASE_MODEL and loaded.metadata["training"] == TRAINING
    # and a loaded membrane saves again to the same thing
    second = str(tmp_path / "again2.safetensors")
    save_membrane(second, loaded)
    reloaded = load_membrane(second)
    assert_same_layers(reloaded, original)
    assert reloaded.concepts == ODD_CONCEPTS
    assert reloaded.metadata["training"] == TRAINING


def test_round_trip_per_layer_alpha_and_no_concepts(tmp_path, sd1):
    original = random_membrane(sd1, concepts=(), per_layer_alpha=True)
    path = str(tmp_path / "alphas.safetensors")
    save_membrane(path, original)
    loaded = load_membrane(path)
    assert_same_layers(loaded, original)
    assert loaded.concepts == ()
    assert len({layer.alpha for layer in loaded.layers.values()}) == len(original.layers)


def test_written_file_uses_public_keys_and_metadata(tmp_path, sd1):
    original = random_membrane(sd1, rank=1)
    path = str(tmp_path / "public_keys.safetensors")
    save_membrane(path, original, base_model=BASE_MODEL)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        keys = set(handle.keys())
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in keys}
    expected = {name + suffix for name in sd1.layer_names
                for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha")}
    assert keys == expected
    for name, shape in sd1.weight_shapes.items():
        if name.endswith(CONV_LAYERS):  # 1x1 convs are 4-D so stock loaders (A1111, kohya) read them
            assert shapes[name + ".lora_down.weight"] == (1, shape[1], 1, 1)
            assert shapes[name + ".lora_up.weight"] == (shape[0], 1, 1, 1)
        else:
            assert shapes[name + ".lora_down.weight"] == (1, shape[1])
            assert shapes[name + ".lora_up.weight"] == (shape[0], 1)
        assert shapes[name + ".alpha"] == ()
    # what the public readers look at
    assert metadata["rank"] == "1" and float(metadata["alpha"]) == 1.0
    assert metadata["prompts"].split(",")[0] == "snoopy"
    assert metadata["architecture"] == "sd1"
    # Unicode is stored as such, not \\u-escaped
    assert "Pokémon, Pikachu ⚡" in metadata["concepts"] and "千と千尋の神隠し" in metadata["concepts"]
    assert json.loads(metadata["base_model"]) == BASE_MODEL


# --------------------------------------------------------------------------------------------
# 4. ComfyUI's own LoRA loader reads our files


def test_stock_comfy_lora_loader_reads_our_file(tmp_path, sd1, caplog):
    original = random_membrane(sd1, rank=2, per_layer_alpha=True)
    path = str(tmp_path / "for_stock.safetensors")
    save_membrane(path, original, base_model=BASE_MODEL, training=TRAINING)

    lora_sd = comfy.utils.load_torch_file(path, safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(sd1.patcher.model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(lora_sd, key_map)
    not_loaded = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert not_loaded == []
    assert set(patches) == {sd1.key_map[name] for name in original.layers}

    # the patched weights are W + alpha/rank * up @ down, as our own math says
    patcher = sd1.patcher.clone()
    patcher.add_patches(patches, 1.0)
    for name, layer in original.layers.items():
        key = sd1.key_map[name]
        weight = sd1.state_dict[key].detach().clone()
        patched = comfy.lora.calculate_weight(patcher.patches[key], weight.clone(), key)
        expected = weight + layer.delta_weight().reshape(weight.shape)
        torch.testing.assert_close(patched, expected, rtol=1e-5, atol=1e-5, msg=name)


def test_stock_loader_check_does_see_unloaded_keys(tmp_path, sd1, caplog):
    """Control: the warning the test above looks for is really captured when a key is foreign."""
    tensors = lora_tensors(sd1.weight_shapes)
    tensors["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(1, 4)
    lora_sd = comfy.utils.load_torch_file(write(tmp_path / "x.safetensors", tensors), safe_load=True)
    with caplog.at_level(logging.WARNING):
        comfy.lora.load_lora(lora_sd, sd1.key_map)
    assert any("lora key not loaded: lora_unet_not_a_layer" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------
# 5. bad files: SPMFileError naming the file and the problem


@pytest.fixture
def good_tensors(sd1):
    return lora_tensors(sd1.weight_shapes, seed=7)


def test_truncated_file(tmp_path, sd1):
    good = write_public(tmp_path / "good.safetensors", sd1)
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    expect_file_error(truncated, "truncated or corrupt")


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(random.Random(0).randbytes(4096))
    expect_file_error(path, "not a readable safetensors file")


def test_header_only_garbage(tmp_path):
    path = tmp_path / "bad_header.safetensors"
    header = b'{"lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 16'
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    expect_file_error(path, "not a readable safetensors file")


class _Payload:
    """Unpickling this creates the marker file: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_works(tmp_path):
    """Control: the payload really runs code when unpickled, so the refusal tests mean something."""
    marker = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(_Payload(str(marker)))).close()
    assert marker.exists()


@pytest.mark.parametrize("file_name", ["evil.pt", "evil.ckpt", "evil.pth", "evil.bin", "evil.pkl", "EVIL.CKPT"])
def test_pickled_checkpoint_refused_without_reading(tmp_path, file_name):
    marker = tmp_path / "pwned"
    path = tmp_path / file_name
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    message = expect_file_error(path, "pickled", "convert", "safetensors")
    assert "save_file" in message  # says how to convert
    assert not marker.exists()


def test_pickled_checkpoint_refused_even_if_missing(tmp_path):
    expect_file_error(tmp_path / "absent.ckpt", "pickled")


def test_pickle_renamed_to_safetensors_is_not_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "renamed.safetensors"
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    expect_file_error(path, "not a readable safetensors file")
    assert not marker.exists()


@pytest.mark.parametrize("file_name", ["membrane.txt", "membrane.lora", "membrane", "membrane.safetensors.bak"])
def test_wrong_extension(tmp_path, good_tensors, file_name):
    path = write(tmp_path / file_name, good_tensors)  # valid content, wrong name
    expect_file_error(path, "not a .safetensors file")


def test_missing_file(tmp_path):
    expect_file_error(tmp_path / "nowhere.safetensors", "not found")


def test_directory_is_not_a_file(tmp_path):
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    expect_file_error(folder, "not found")


def test_huge_file_refused(tmp_path, good_tensors, monkeypatch):
    path = write(tmp_path / "checkpoint.safetensors", good_tensors)
    monkeypatch.setattr(file_format, "MAX_FILE_BYTES", os.path.getsize(path) - 1)
    expect_file_error(path, "full model checkpoint")


def test_empty_safetensors(tmp_path):
    path = write(tmp_path / "empty.safetensors", {}, {"prompts": "snoopy"})
    expect_file_error(path, "no tensors")


RESNET = "lora_unet_down_blocks_0_resnets_0_conv1"
TEXT_ENCODER = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def lora_pair(name, out_features=32, in_features=32, rank=1):
    return {name + ".lora_down.weight": torch.ones(rank, in_features),
            name + ".lora_up.weight": torch.ones(out_features, rank),
            name + ".alpha": torch.tensor(1.0)}


def test_non_spm_lora_resnet_only(tmp_path):
    tensors = {**lora_pair(RESNET), **lora_pair(RESNET.replace("conv1", "conv2"))}
    path = write(tmp_path / "resnet_lora.safetensors", tensors)
    expect_file_error(path, "not an SPM membrane", RESNET)


def test_non_spm_lora_text_encoder_only(tmp_path):
    path = write(tmp_path / "te_lora.safetensors", lora_pair(TEXT_ENCODER))
    expect_file_error(path, "not an SPM membrane", TEXT_ENCODER)


def test_non_spm_lora_with_resnet_layers(tmp_path, good_tensors):
    path = write(tmp_path / "full_lora.safetensors", {**good_tensors, **lora_pair(RESNET)})
    expect_file_error(path, "not an SPM membrane", "outside the transformer blocks", "LoraLoader")


def test_non_spm_lora_with_text_encoder(tmp_path, good_tensors):
    path = write(tmp_path / "unet_te_lora.safetensors", {**good_tensors, **lora_pair(TEXT_ENCODER)})
    expect_file_error(path, "not an SPM membrane", "text encoder", "LoraLoader")


def test_other_adapter_type_on_spm_layers(tmp_path, sd1):
    name = some_layer(sd1, "attn2_to_k")
    loha = {name + ".hada_w1_a": torch.ones(32, 2), name + ".hada_w1_b": torch.ones(2, 768),
            name + ".alpha": torch.tensor(1.0)}
    expect_file_error(write(tmp_path / "loha.safetensors", loha), "not an SPM membrane", "hada_w1")


@pytest.mark.parametrize("missing", ["lora_up.weight", "lora_down.weight"])
def test_layer_missing_up_or_down(tmp_path, sd1, good_tensors, missing):
    name = some_layer(sd1, "attn2_to_v")
    del good_tensors[f"{name}.{missing}"]
    path = write(tmp_path / "half_layer.safetensors", good_tensors, dict(PUBLIC_METADATA))
    expect_file_error(path, name, f"no {missing}")


def test_rank_mismatch_between_up_and_down(tmp_path, sd1, good_tensors):
    name = some_layer(sd1, "ff_net_2")
    out_features, in_features = sd1.weight_shapes[name]
    good_tensors[name + ".lora_down.weight"] = torch.ones(2, in_features)  # up stays (out, 1)
    path = write(tmp_path / "ranks.safetensors", good_tensors)
    expect_file_error(path, name, "rank mismatch")


def test_conv_and_linear_halves_do_not_pair(tmp_path, sd1, good_tensors):
    name = some_layer(sd1, "proj_in")
    good_tensors[name + ".lora_down.weight"] = good_tensors[name + ".lora_down.weight"].reshape(1, -1)
    expect_file_error(write(tmp_path / "pair.safetensors", good_tensors), name, "not a matching pair")


def test_3x3_kernel_refused(tmp_path, sd1, good_tensors):
    name = some_layer(sd1, "proj_out")
    good_tensors[name + ".lora_down.weight"] = torch.ones(1, 32, 3, 3)
    expect_file_error(write(tmp_path / "k3.safetensors", good_tensors), name, "1x1")


@pytest.mark.parametrize("part, value", [("lora_down.weight", float("nan")), ("lora_up.weight", float("inf")),
                                         ("lora_down.weight", float("-inf")), ("lora_up.weight", float("nan"))])
def test_non_finite_weights(tmp_path, sd1, good_tensors, part, value):
    name = some_layer(sd1, "attn1_to_q")
    good_tensors[f"{name}.{part}"] = good_tensors[f"{name}.{part}"].clone()
    good_tensors[f"{name}.{part}"][0, -1] = value
    path = write(tmp_path / "nonfinite.safetensors", good_tensors, dict(PUBLIC_METADATA))
    expect_file_error(path, name, "NaN or inf")


def test_non_finite_alpha(tmp_path, sd1, good_tensors):
    name = some_layer(sd1, "attn1_to_q")
    good_tensors[name + ".alpha"] = torch.tensor(float("nan"))
    expect_file_error(write(tmp_path / "nanalpha.safetensors", good_tensors), name, "alpha is nan")


def test_alpha_not_a_scalar(tmp_path, sd1, good_tensors):
    name = some_layer(sd1, "attn1_to_q")
    good_tensors[name + ".alpha"] = torch.tensor([1.0, 2.0])
    expect_file_error(write(tmp_path / "alpha2.safetensors", good_tensors), name, "single number")


def test_metadata_rank_contradicts_tensors(tmp_path, sd1):
    path = write_public(tmp_path / "rank.safetensors", sd1, {**PUBLIC_METADATA, "rank": "4"})
    expect_file_error(path, "metadata says rank 4", "[1]")


def test_metadata_rank_not_a_number(tmp_path, sd1):
    path = write_public(tmp_path / "rank_text.safetensors", sd1, {**PUBLIC_METADATA, "rank": "one"})
    expect_file_error(path, "'rank'", "not a whole number")


def test_metadata_alpha_contradicts_alpha_tensors(tmp_path, sd1):
    path = write_public(tmp_path / "alpha.safetensors", sd1, {**PUBLIC_METADATA, "alpha": "4.0"}, alpha=1.0)
    expect_file_error(path, "metadata says alpha 4.0")


def test_metadata_alpha_not_a_number(tmp_path, sd1):
    path = write_public(tmp_path / "alpha_text.safetensors", sd1, {**PUBLIC_METADATA, "alpha": "high"})
    expect_file_error(path, "'alpha'", "not a number")


def test_metadata_alpha_contradicts_default_alpha(tmp_path, sd1):
    """No alpha tensors means alpha = rank; metadata saying otherwise is a contradiction."""
    tensors = lora_tensors(sd1.weight_shapes, rank=4, with_alpha=False)
    path = write(tmp_path / "noalpha.safetensors", tensors, {"rank": "4", "alpha": "1.0"})
    expect_file_error(path, "metadata says alpha 1.0")


@pytest.mark.parametrize("concepts, phrases", [
    ('[{"target": "snoopy"', ("'concepts'", "not valid JSON")),
    ('{"target": "snoopy"}', ("'concepts'", "must be a JSON list")),
    ('"snoopy"', ("must be a JSON list",)),
    ('["snoo\\u0007py"]', ("control characters",)),
    ('[{"target": "snoopy", "aliases": ["peanuts\\u0000dog"]}]', ("alias", "control characters")),
    ('["snoo\u200bpy"]', ("invisible or text-direction characters", "U+200B")),
    ('[{"target": "snoopy", "aliases": ["\u202eypoons"]}]', ("alias", "U+202E")),
    ('["snoopy", ""]', ("concept target", "is empty")),
    ('["snoopy", "   "]', ("is empty",)),
    ('[{"target": ""}]', ("is empty",)),
    ('[{"surrogate": "cat"}]', ("'target'",)),
    ('[{"target": "snoopy", "colour": "red"}]', ("unknown fields", "colour")),
    ('[42]', ("must be a string or an object",)),
    ('[{"target": "snoopy", "aliases": "peanuts"}]', ("aliases", "list")),
    ('[{"target": 7}]', ("must be text",)),
])
def test_bad_concepts_metadata(tmp_path, sd1, concepts, phrases):
    path = write_public(tmp_path / "concepts.safetensors", sd1, {"concepts": concepts, "rank": "1"})
    expect_file_error(path, *phrases)


def test_control_character_in_public_prompts(tmp_path, sd1):
    path = write_public(tmp_path / "ctl.safetensors", sd1, {"prompts": "snoopy,mick\x1bey", "rank": "1"})
    expect_file_error(path, "control characters")


@pytest.mark.parametrize("concepts, prompts", [('["snoopy"]', "mickey"), ("[]", "snoopy")])
def test_prompts_contradict_concepts(tmp_path, sd1, concepts, prompts):
    metadata = {"concepts": concepts, "prompts": prompts, "rank": "1"}
    expect_file_error(write_public(tmp_path / "contra.safetensors", sd1, metadata), "'prompts'", "contradicts")


def test_too_many_concepts(tmp_path, sd1):
    targets = [f"concept {i}" for i in range(MAX_CONCEPTS + 1)]
    path = write_public(tmp_path / "many.safetensors", sd1, {"concepts": json.dumps(targets), "rank": "1"})
    expect_file_error(path, f"{MAX_CONCEPTS + 1} concepts", f"at most {MAX_CONCEPTS}")
    prompts = write_public(tmp_path / "many_prompts.safetensors", sd1, {"prompts": ",".join(targets), "rank": "1"})
    expect_file_error(prompts, f"at most {MAX_CONCEPTS}")


def test_max_concepts_is_accepted(tmp_path, sd1):
    targets = [f"concept {i}" for i in range(MAX_CONCEPTS)]
    path = write_public(tmp_path / "enough.safetensors", sd1, {"concepts": json.dumps(targets), "rank": "1"})
    assert [c.target for c in load_membrane(path).concepts] == targets


def test_architecture_metadata_contradicts_shapes(tmp_path, sd1):
    path = write_public(tmp_path / "arch.safetensors", sd1, {**PUBLIC_METADATA, "architecture": "sdxl"})
    expect_file_error(path, "architecture sdxl", "sd1")


def test_unknown_architecture_value(tmp_path, sd1):
    path = write_public(tmp_path / "arch3.safetensors", sd1, {**PUBLIC_METADATA, "architecture": "sd3"})
    expect_file_error(path, "'architecture'", "sd3", "expected one of")


@pytest.mark.parametrize("key", ["base_model", "training"])
def test_invalid_json_in_base_model_or_training(tmp_path, sd1, key):
    path = write_public(tmp_path / "json.safetensors", sd1, {**PUBLIC_METADATA, key: "{name: tiny}"})
    expect_file_error(path, f"'{key}'", "not valid JSON")


def test_file_errors_are_value_errors_for_the_node():
    error = SPMFileError("/models/spm/x.safetensors", "broken")
    assert isinstance(error, SPMError) and isinstance(error, ValueError)
    assert str(error) == "/models/spm/x.safetensors: broken"


# --------------------------------------------------------------------------------------------
# 6. a membrane for another model


def test_membrane_binds_to_its_own_model(tmp_path, sd1, sdxl):
    for model in (sd1, sdxl):
        path = write_public(tmp_path / f"{model.arch}.safetensors", model)
        membrane = load_membrane(path)
        assert membrane.architecture == model.arch
        bound = bind_membrane(membrane, model.key_map, model.module_shapes)
        assert set(bound) == set(model.module_shapes) == {model.key_map[n] for n in model.layer_names}


def test_sdxl_membrane_on_sd1_model(tmp_path, sd1, sdxl):
    # same layer names as the tiny SD1 UNet, SDXL shapes (2048-wide cross-attention, Linear proj)
    assert sdxl.layer_names == sd1.layer_names
    path = write_public(tmp_path / "sdxl_snoopy.safetensors", sdxl)
    membrane = load_membrane(path)
    assert membrane.architecture == "sdxl"
    with pytest.raises(SPMModelMismatch) as caught:
        bind_membrane(membrane, sd1.key_map, sd1.module_shapes)
    message = str(caught.value)
    assert "sdxl_snoopy.safetensors" in message
    assert "does not fit" in message and "sdxl" in message


def test_cross_attention_width_mismatch_alone(tmp_path, sd1):
    """Only attn2_to_k/v are SDXL-wide: every other layer would fit, the membrane still does not."""
    shapes = dict(sd1.weight_shapes)
    wide = [name for name in shapes if name.endswith(("attn2_to_k", "attn2_to_v"))]
    for name in wide:
        shapes[name] = (shapes[name][0], 2048)
    path = write(tmp_path / "wide_context.safetensors", lora_tensors(shapes), dict(PUBLIC_METADATA))
    membrane = load_membrane(path)
    assert membrane.architecture == "sdxl"
    with pytest.raises(SPMModelMismatch) as caught:
        bind_membrane(membrane, sd1.key_map, sd1.module_shapes)
    message = str(caught.value)
    assert "wide_context.safetensors" in message and "does not fit" in message
    assert any(name in message for name in wide) and "2048" in message


def test_layer_name_not_in_model(tmp_path, sd1):
    # a real SDXL layer name; the tiny SD1 UNet has no down_blocks_2 transformers
    name = "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_k"
    assert DIFFUSERS_LAYER.match(name) and name not in sd1.key_map
    tensors = {**lora_tensors(sd1.weight_shapes), **lora_pair(name, 1280, 2048)}
    membrane = load_membrane(write(tmp_path / "real_sdxl_names.safetensors", tensors, dict(PUBLIC_METADATA)))
    with pytest.raises(SPMModelMismatch) as caught:
        bind_membrane(membrane, sd1.key_map, sd1.module_shapes)
    message = str(caught.value)
    assert "real_sdxl_names.safetensors" in message
    assert name in message and "no matching layer" in message


def test_layer_maps_to_module_without_shape(tmp_path, sd1):
    membrane = load_membrane(write_public(tmp_path / "partial.safetensors", sd1))
    name = some_layer(sd1, "ff_net_0_proj")
    shapes = {key: shape for key, shape in sd1.module_shapes.items() if key != sd1.key_map[name]}
    with pytest.raises(SPMModelMismatch) as caught:
        bind_membrane(membrane, sd1.key_map, shapes)
    assert "partial.safetensors" in str(caught.value) and name in str(caught.value)


# --------------------------------------------------------------------------------------------
# files that once tripped the reader: mixed ranks, NFD Unicode, half-precision alpha,
# kohya's original-UNet layer names, 1x1 convs stored as matrices


def test_round_trip_mixed_rank(tmp_path, sd1):
    original = random_membrane(sd1, rank=1)
    name = some_layer(sd1, "attn2_to_k")
    out_features, in_features = sd1.weight_shapes[name]
    original.layers[name] = LayerWeights(torch.randn(4, in_features), torch.randn(out_features, 4), 1.0)
    path = str(tmp_path / "mixed.safetensors")
    save_membrane(path, original)
    assert_same_layers(load_membrane(path), original)


def test_decomposed_unicode_concept_names(tmp_path, sd1):
    import unicodedata

    decomposed = unicodedata.normalize("NFD", "Pokémon")
    assert decomposed != "Pokémon"
    metadata = {"concepts": json.dumps([decomposed], ensure_ascii=False), "prompts": decomposed, "rank": "1"}
    membrane = load_membrane(write_public(tmp_path / "nfd.safetensors", sd1, metadata))
    assert [c.target for c in membrane.concepts] == ["Pokémon"]


def test_half_precision_alpha_matches_metadata(tmp_path, sd1):
    metadata = {"prompts": "snoopy", "rank": "1", "alpha": "0.3"}
    path = write_public(tmp_path / "bf16.safetensors", sd1, metadata, alpha=0.3, dtype=torch.bfloat16)
    membrane = load_membrane(path)
    assert all(layer.alpha == pytest.approx(0.3, rel=1e-2) for layer in membrane.layers.values())


def test_kohya_ldm_layer_names(tmp_path, sd1):
    """kohya's SDXL LoRAs name layers after the original UNet (input_blocks_4_1_...); ComfyUI's key
    map has those names too. An attention-only LoRA in that naming should read as a membrane."""
    ldm_names = {}
    for name in sd1.layer_names:
        key = sd1.key_map[name]
        ldm_names["lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")] = name
    assert all(ldm in sd1.key_map for ldm in ldm_names)
    shapes = {ldm: sd1.weight_shapes[name] for ldm, name in ldm_names.items()}
    membrane = load_membrane(write(tmp_path / "kohya_ldm.safetensors", lora_tensors(shapes, rank=4)))
    assert set(bind_membrane(membrane, sd1.key_map, sd1.module_shapes)) == set(sd1.module_shapes)


def test_matrix_stored_conv_layer_applies_as_conv(tmp_path, sd1):
    """ComfyUI's own loader accepts proj_in/proj_out stored as 2-D matrices (it reshapes the delta to
    the weight); the membrane must then act as the 1x1 convolution it patches, or be refused."""
    from spm_core.membrane import FusedLayer

    shapes = {name: shape[:2] for name, shape in sd1.weight_shapes.items()}  # every layer 2-D
    membrane = load_membrane(write(tmp_path / "flat_proj.safetensors", lora_tensors(shapes), dict(PUBLIC_METADATA)))
    bound = bind_membrane(membrane, sd1.key_map, sd1.module_shapes)
    name = some_layer(sd1, "proj_in")
    key = sd1.key_map[name]
    assert sd1.module_shapes[key][2]  # the model's module is a 1x1 convolution
    x = torch.randn(2, sd1.weight_shapes[name][1], 4, 4)
    delta = FusedLayer([(0, bound[key])]).delta(x, torch.ones(2, 1))
    expected = torch.nn.functional.conv2d(x, membrane.layers[name].delta_weight()[:, :, None, None])
    torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-5)
