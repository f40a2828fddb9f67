"""Full-size SD1.5 and SDXL layouts: a membrane file laid out from the real diffusers configs
maps 100% onto ComfyUI's model keys and fits every layer's shape. Built on the meta device."""

import pytest
import torch
from membrane_helpers import shapes_of
from safetensors.torch import save_file

from spm_core.file_format import DIFFUSERS_LAYER, load_membrane
from spm_core.stack import bind_membrane

BASE = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "model_channels": 320, "use_temporal_attention": False, "use_temporal_resblock": False}
# ComfyUI builds output blocks from the end of transformer_depth_output: lowest resolution last.
LAYOUTS = {
    "sd1": {
        "comfy": "SD15",
        "unet": {**BASE, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
                 "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
                 "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                 "use_linear_in_transformer": False, "context_dim": 768},
        "diffusers": dict(
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        "modules": 192, "parameters": 423_936,  # + 192 alpha scalars = ~424k: a rank-1 membrane on SD1.5
    },
    "sdxl": {
        "comfy": "SDXL",
        "unet": {**BASE, "adm_in_channels": 2816, "num_classes": "sequential", "num_res_blocks": [2, 2, 2],
                 "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
                 "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_linear_in_transformer": True,
                 "context_dim": 2048},
        "diffusers": dict(
            block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
        "modules": 722, "parameters": None,
    },
}
TARGET_SUFFIXES = ("proj_in", "proj_out", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                   "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def public_spm_file(path, layout):
    """An SPM file as the official trainer writes it: rank 1, alpha 1, `prompts` metadata."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**layout["diffusers"])
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in unet.named_modules():
        if ".attentions." not in f".{name}" or not name.endswith(TARGET_SUFFIXES):
            continue
        if "transformer_blocks" not in name and not name.endswith(("proj_in", "proj_out")):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        weight = module.weight
        down_shape = (1, weight.shape[1], *weight.shape[2:])
        up_shape = (weight.shape[0], 1, *weight.shape[2:])
        tensors[key + ".lora_down.weight"] = torch.randn(down_shape, generator=generator) * 0.01
        tensors[key + ".lora_up.weight"] = torch.randn(up_shape, generator=generator) * 0.01
        tensors[key + ".alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path), metadata={"prompts": "snoopy", "rank": "1", "alpha": "1.0"})


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_full_layout_maps_completely(arch, tmp_path):
    import comfy.lora
    import comfy.supported_models

    layout = LAYOUTS[arch]
    path = tmp_path / f"full-{arch}.safetensors"
    public_spm_file(path, layout)
    membrane = load_membrane(str(path))
    assert len(membrane.layers) == layout["modules"]
    assert all(DIFFUSERS_LAYER.match(name) for name in membrane.layers)
    assert membrane.architecture == arch
    if layout["parameters"]:
        assert membrane.parameter_count == layout["parameters"]

    model = getattr(comfy.supported_models, layout["comfy"])(dict(layout["unet"])).get_model({}, device="meta")
    key_map = {name: key[: -len(".weight")] for name, key in comfy.lora.model_lora_keys_unet(model, {}).items()}
    unmapped = [name for name in membrane.layers if name not in key_map]
    assert unmapped == []
    modules = {key_map[name]: model.get_submodule(key_map[name]) for name in membrane.layers}
    bound = bind_membrane(membrane, key_map, shapes_of(modules))
    assert len(bound) == layout["modules"]
    assert len(set(bound)) == layout["modules"], "two membrane layers landed on one model layer"
