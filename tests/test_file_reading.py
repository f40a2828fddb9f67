"""Files others wrote are read unchanged: the public SPM release's and kohya / LECO style LoRAs, in
the shapes of a tiny SD1 UNet built from ComfyUI's classes (conftest's `sd1`)."""


import pytest
import torch
from file_helpers import CONV_LAYERS, lora_tensors, write, write_public

from spm_core.file_format import load_membrane


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
