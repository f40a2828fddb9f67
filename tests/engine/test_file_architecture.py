"""Which model family a membrane file is for, read from the widths of its cross-attention layers."""


import pytest
import torch
from file_helpers import PUBLIC_METADATA, lora_tensors, write

from spm_core.file_format import infer_architecture, load_membrane
from spm_core.membrane import LayerWeights


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
