"""A membrane file spoiled in its container or its tensors is refused by name (SPMFileError naming
the file and the problem): truncated, misnamed or oversized files, layers membranes do not adapt,
halves that do not pair, kernels that are not 1x1, values that are not finite."""

import os

import pytest
import torch
from file_helpers import PUBLIC_METADATA, RESNET, TEXT_ENCODER, expect_file_error, lora_pair, lora_tensors, some_layer, write, write_public

from spm_core import file_format


@pytest.fixture
def good_tensors(sd1):
    return lora_tensors(sd1.weight_shapes, seed=7)


def test_truncated_file(tmp_path, sd1):
    good = write_public(tmp_path / "good.safetensors", sd1)
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    expect_file_error(truncated, "truncated or corrupt")


@pytest.mark.parametrize("file_name", ["membrane.txt", "membrane.lora", "membrane", "membrane.safetensors.bak"])
def test_wrong_extension(tmp_path, good_tensors, file_name):
    path = write(tmp_path / file_name, good_tensors)  # valid content, wrong name
    expect_file_error(path, "not a .safetensors file")


def test_huge_file_refused(tmp_path, good_tensors, monkeypatch):
    path = write(tmp_path / "checkpoint.safetensors", good_tensors)
    monkeypatch.setattr(file_format, "MAX_FILE_BYTES", os.path.getsize(path) - 1)
    expect_file_error(path, "full model checkpoint")


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
