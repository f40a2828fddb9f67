"""Where membrane files live: `models/spm` (registered as a model folder, so extra_model_paths.yaml
can add more under the name `spm`) and SPM files that people keep in `models/loras`."""

from __future__ import annotations

import json
import os
import re
import struct

import folder_paths

from ..spm_core.errors import SPMError

FOLDER = "spm"
LORA_PREFIX = "loras/"
SPM_METADATA_KEYS = ("spm_format", "prompts", "concepts")


def register_folder() -> None:
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, default, is_default=True)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], {".safetensors"})


def _header_metadata(path: str) -> dict:
    """The safetensors header's metadata, read without loading tensors (cheap for big LoRA folders)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * 2**20:
                return {}
            return json.loads(handle.read(length)).get("__metadata__", {}) or {}
    except (OSError, struct.error, ValueError):
        return {}


PARTIAL_SUFFIX = ".partial.safetensors"  # what an interrupted Train SPM leaves behind


def membrane_choices() -> list[str]:
    """Files of `models/spm`, then `models/loras` files whose metadata marks them as SPM membranes;
    never a training run's unfinished `.partial.safetensors` (Train SPM resumes it by name)."""
    choices = [name for name in folder_paths.get_filename_list(FOLDER) if _offered(name)]
    for name in folder_paths.get_filename_list("loras"):
        path = folder_paths.get_full_path("loras", name)
        if _offered(name) and path and any(k in _header_metadata(path) for k in SPM_METADATA_KEYS):
            choices.append(LORA_PREFIX + name)
    return choices


def _offered(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(".safetensors") and not lower.endswith(PARTIAL_SUFFIX)


def membrane_path(choice: str) -> str:
    """Full path of a choice from `membrane_choices`; a clear error if it is not there any more."""
    if choice.startswith(LORA_PREFIX):
        path = folder_paths.get_full_path("loras", choice[len(LORA_PREFIX):])
    else:
        path = folder_paths.get_full_path(FOLDER, choice)
    if path is None:
        raise FileNotFoundError(f"membrane file {choice!r} not found in models/{FOLDER} or models/loras; refresh the node list")
    return path


def safe_stem(name: str) -> str:
    """A file name (without extension) a user typed, checked so it cannot leave its folder."""
    stem = name.strip().removesuffix(".safetensors")
    if not re.fullmatch(r"[\w\-. ]{1,120}", stem) or stem.startswith("."):
        raise ValueError(f"file name {name!r} is not allowed; use letters, digits, '-', '_' and '.'")
    return stem


def refuse_to_replace(path: str, overwrite: bool, alternative: str = "") -> None:
    """A clear error instead of silently replacing a user's file."""
    if os.path.exists(path) and not overwrite:
        raise SPMError(f"{path} already exists; choose another name, or switch 'overwrite' on to replace it{alternative}")
