"""Our own format: a saved membrane loads back with everything it had, in the public keys and
metadata, and ComfyUI's own LoRA loader reads it."""

import json
import logging

import comfy.lora
import comfy.utils
import torch
from file_helpers import BASE_MODEL, CONV_LAYERS, ODD_CONCEPTS, TRAINING, assert_same_layers, lora_tensors, random_membrane, write
from safetensors import safe_open

from spm_core import file_format
from spm_core.file_format import load_membrane, save_membrane

# --------------------------------------------------------------------------------------------
# save then load gives back everything


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
# ComfyUI's own LoRA loader reads our files


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
