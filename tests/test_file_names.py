"""File names and replaced files (issue 16, findings 10 and 11): SPM Train Membrane and SPM Save as
LoRA refuse names that SPM Load Membrane would not list or that a system would change, and a file
replaced under its name (size and mtime kept, as `cp -p` and sync tools do) is seen: listed when a
LoRA became a membrane, reloaded when a membrane's weights changed."""

from __future__ import annotations

import os
import uuid

import pytest
import safetensors.torch
import torch
from pack import load_spm, node, pack_module

REFUSED_NAMES = {  # name typed -> what the refusal says
    "x.partial": "names ending in '.partial' are SPM Train Membrane's unfinished runs",
    "Snow.PARTIAL.safetensors": "names ending in '.partial' are SPM Train Membrane's unfinished runs",
    "evil.": "it ends with '.'",
    "evil..safetensors": "it ends with '.'",
    "trailing .safetensors": "it ends with ' '",
}


@pytest.fixture
def loras_folder(spm_world, tmp_path):
    import folder_paths

    folder = tmp_path / "loras"
    folder.mkdir()
    folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    return folder


@pytest.mark.parametrize("name", list(REFUSED_NAMES))
def test_save_as_lora_refuses_a_name_load_would_not_list_and_writes_nothing(spm_world, loras_folder, name):
    patcher, clip, _ = spm_world
    model = load_spm(patcher, clip, "snoopy.safetensors")
    with pytest.raises(ValueError, match="not allowed") as refusal:
        node("SPMSaveAsLoRA").execute(model, name)
    assert REFUSED_NAMES[name] in str(refusal.value) and repr(name) in str(refusal.value)
    assert list(loras_folder.iterdir()) == []


@pytest.mark.parametrize("name", list(REFUSED_NAMES))
def test_training_refuses_a_name_load_would_not_list_before_it_starts(spm_world, name):
    patcher, clip, folder = spm_world
    before = sorted(os.listdir(folder))
    with pytest.raises(ValueError, match="not allowed") as refusal:
        node("SPMTrain").execute(model=patcher, clip=clip, target="snoopy", surrogate="", neutral="", iterations=2,
                                 learning_rate=1e-3, rank=1, alpha=1.0, anchor_strength=1.0, anchor_samples=1,
                                 surrogate_sampler="prompts", erase_guidance=1.0, rollout_steps=2, latent_size=8, seed=0,
                                 name=name, resume=False)
    assert REFUSED_NAMES[name] in str(refusal.value)
    assert sorted(os.listdir(folder)) == before


def test_a_saved_lora_with_dots_in_its_name_is_listed_by_load(spm_world, loras_folder):
    patcher, clip, _ = spm_world
    model = load_spm(patcher, clip, "snoopy.safetensors")
    path = node("SPMSaveAsLoRA").execute(model, "snoopy.v2").result[0]
    assert os.path.basename(path) == "snoopy.v2.safetensors"
    assert "loras/snoopy.v2.safetensors" in pack_module("nodes.paths").membrane_choices()


def write_same_size(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], like=None) -> None:
    """Writes `path` in place (same inode when it exists), with the size and mtime of `like`'s file."""
    data = safetensors.torch.save(tensors, metadata)
    if like is not None:
        times = os.stat(like)
        assert len(data) == times.st_size, "the test needs files of one size"
    with open(path, "r+b" if os.path.exists(path) else "wb") as handle:
        handle.write(data)
    if like is not None:
        os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))


LORA_TENSORS = {"lora_unet_x.lora_down.weight": torch.ones(1, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 1)}
PLAIN, TAGGED = {"comment": "snowman"}, {"prompts": "snowman"}  # same length: same file size


def test_a_lora_replaced_in_place_by_a_membrane_of_the_same_size_and_mtime_is_listed(loras_folder):
    paths = pack_module("nodes.paths")
    lora = loras_folder / f"style_{uuid.uuid4().hex[:8]}.safetensors"
    write_same_size(lora, LORA_TENSORS, PLAIN)
    assert f"loras/{lora.name}" not in paths.membrane_choices()
    write_same_size(lora, LORA_TENSORS, TAGGED, like=lora)
    assert f"loras/{lora.name}" in paths.membrane_choices()


def test_a_file_renamed_into_place_is_read_again_even_long_after_it_was_read(loras_folder, monkeypatch):
    """What sync tools do: a copy with the old size and mtime renamed over the file (a new inode),
    here after the first read was kept (RACY_NS 0: as if read long after the file was written)."""
    paths = pack_module("nodes.paths")
    monkeypatch.setattr(paths, "RACY_NS", 0)
    lora = loras_folder / f"style_{uuid.uuid4().hex[:8]}.safetensors"
    write_same_size(lora, LORA_TENSORS, PLAIN)
    assert f"loras/{lora.name}" not in paths.membrane_choices()
    copy = loras_folder / "incoming.tmp"
    write_same_size(copy, LORA_TENSORS, TAGGED)
    os.utime(copy, ns=(os.stat(lora).st_atime_ns, os.stat(lora).st_mtime_ns))
    os.replace(copy, lora)
    assert f"loras/{lora.name}" in paths.membrane_choices()


def test_content_key_follows_the_bytes_not_the_size_and_mtime(spm_world):
    paths = pack_module("nodes.paths")
    _, _, folder = spm_world
    name = f"swap_{uuid.uuid4().hex[:8]}.safetensors"
    snoopy = safetensors.torch.load_file(str(folder / "snoopy.safetensors"))
    metadata = safetensors.safe_open(str(folder / "snoopy.safetensors"), "pt").metadata()
    write_same_size(folder / name, snoopy, metadata)
    first = paths.content_key(name)
    os.utime(folder / name)  # touched: the bytes are the same
    assert paths.content_key(name) == first
    negated = {k: -v if k.endswith("lora_up.weight") else v for k, v in snoopy.items()}
    write_same_size(folder / name, negated, metadata, like=folder / name)
    assert paths.content_key(name) != first
    with pytest.raises(FileNotFoundError, match="not found"):
        paths.content_key("gone.safetensors")


def test_a_membrane_replaced_under_its_name_is_reloaded_by_the_server(comfy_server):
    """Through the real server: the same prompt queued again after the membrane file was replaced in
    place with its size and mtime kept runs SPM Load Membrane again (new weights, new picture); after
    the file was only touched, ComfyUI's cache serves it."""
    from PIL import Image

    folder = os.path.join(comfy_server.base_dir, "models", "spm")
    name = f"swap_{uuid.uuid4().hex[:8]}.safetensors"
    snoopy = safetensors.torch.load_file(os.path.join(folder, "snoopy.safetensors"))
    metadata = safetensors.safe_open(os.path.join(folder, "snoopy.safetensors"), "pt").metadata()
    write_same_size(os.path.join(folder, name), snoopy, metadata)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "2": {"class_type": "SPMTextEncode", "inputs": {"clip": ["1", 1], "text": "snoopy sitting on a red doghouse"}},
        "3": {"class_type": "SPMTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "SPMLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "membrane": name, "strength": 1.0,
                                                    "transport": "always_open", "rows": "positive only",
                                                    "start_percent": 0.0, "end_percent": 1.0}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["5", 0], "seed": 5, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": name[:-12]}},
    }

    def run() -> tuple[set[str], bytes]:
        entry, events = comfy_server.run_with_events(prompt)
        assert entry["status"]["status_str"] == "success", entry["status"]
        cached = {n for e in events if e["type"] == "execution_cached" for n in e["data"]["nodes"]}
        (image,) = entry["outputs"]["8"]["images"]
        with Image.open(os.path.join(comfy_server.base_dir, "output", image["subfolder"], image["filename"])) as picture:
            return cached, picture.tobytes()

    try:
        _, first = run()
        negated = {k: -v if k.endswith("lora_up.weight") else v for k, v in snoopy.items()}
        write_same_size(os.path.join(folder, name), negated, metadata, like=os.path.join(folder, name))
        cached, replaced = run()
        assert "4" not in cached and replaced != first
        os.utime(os.path.join(folder, name))
        cached, touched = run()
        assert "4" in cached and touched == replaced
    finally:
        os.remove(os.path.join(folder, name))


def test_the_loaders_fingerprint_without_a_file_to_hash_leaves_caching_to_comfyui(spm_world):
    """A name that comes through a link (ComfyUI passes constants only) or a file that is gone: ''
    (no warning, no forced re-run; execute reports a missing file)."""
    loader = node("SPMLoader")
    assert loader.fingerprint_inputs(strength=1.0) == ""
    assert loader.fingerprint_inputs(membrane="gone.safetensors") == ""
    assert loader.fingerprint_inputs(membrane="snoopy.safetensors") == pack_module("nodes.paths").content_key(
        "snoopy.safetensors")
