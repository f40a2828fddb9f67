"""Files that once tripped the reader: mixed ranks, NFD Unicode, half-precision alpha, kohya's
original-UNet layer names, 1x1 convs stored as matrices."""

import json

import pytest
import torch
from file_helpers import PUBLIC_METADATA, assert_same_layers, lora_tensors, random_membrane, some_layer, write, write_public

from spm_core.file_format import load_membrane, save_membrane
from spm_core.membrane import LayerWeights
from spm_core.stack import bind_membrane


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
