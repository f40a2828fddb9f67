"""No silent overwrite: SPM Save as LoRA and SPM Train Membrane never replace an existing file unless the
user switches 'overwrite' on, and a refusal leaves the file as it was."""

import os

import pytest
import torch
from pack import load_spm, node, pack_module


@pytest.fixture
def loras_folder(spm_world, tmp_path):
    import folder_paths

    folder_paths.add_model_folder_path("loras", str(tmp_path), is_default=True)
    return tmp_path


def test_save_as_lora_refuses_an_existing_file_unless_asked(spm_world, loras_folder):
    patcher, clip, _ = spm_world
    users_lora = loras_folder / "favourite_style.safetensors"
    users_lora.write_bytes(b"a user's LoRA that must survive")
    model = load_spm(patcher, clip, "snoopy.safetensors")
    errors = pack_module("spm_core.errors")
    with pytest.raises(errors.SPMError, match="favourite_style.safetensors already exists.*overwrite"):
        node("SPMSaveAsLoRA").execute(model, "favourite_style")
    assert users_lora.read_bytes() == b"a user's LoRA that must survive"
    path = node("SPMSaveAsLoRA").execute(model, "favourite_style", True).result[0]
    assert path == str(users_lora) and users_lora.read_bytes() != b"a user's LoRA that must survive"


def test_training_refuses_to_replace_an_existing_membrane_before_it_starts(spm_world, tmp_path):
    patcher, clip, _ = spm_world
    training = pack_module("nodes.training")
    config = pack_module("spm_core.training").TrainingConfig(iterations=2, latent_sizes=[8], rollout_steps=2)
    existing = tmp_path / "snoopy.safetensors"
    existing.write_bytes(b"an earlier membrane")
    steps = []
    errors = pack_module("spm_core.errors")
    with pytest.raises(errors.SPMError, match="already exists.*overwrite") as finished:
        with torch.inference_mode(False):
            training.train(patcher, clip, training.TrainingRequest(["snoopy"], [], "", config, str(existing)), steps.append)
    assert "resume" not in str(finished.value), "a finished membrane has no run to resume"
    (tmp_path / "snoopy.partial.safetensors").write_bytes(b"a cancelled run")
    with pytest.raises(errors.SPMError, match="already exists.*overwrite.*'resume' to continue its unfinished run"):
        with torch.inference_mode(False):
            training.train(patcher, clip, training.TrainingRequest(["snoopy"], [], "", config, str(existing)), steps.append)
    (tmp_path / "snoopy.partial.safetensors").unlink()
    assert steps == [] and existing.read_bytes() == b"an earlier membrane"
    with torch.inference_mode(False):
        training.train(patcher, clip, training.TrainingRequest(["snoopy"], [], "", config, str(existing), overwrite=True))
    assert os.path.getsize(existing) > 1000
