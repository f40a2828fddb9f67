"""A membrane for another model: binding checks each layer's name and shape against the model and
names the file when the membrane does not fit."""


import pytest
from file_helpers import PUBLIC_METADATA, TinyModel, lora_pair, lora_tensors, some_layer, write, write_public

from spm_core.errors import SPMModelMismatch
from spm_core.file_format import DIFFUSERS_LAYER, load_membrane
from spm_core.stack import bind_membrane


@pytest.fixture(scope="module")
def sdxl():
    """Tiny SDXL UNet with the real SDXL cross-attention width (2048)."""
    return TinyModel("sdxl", context=2048)


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
