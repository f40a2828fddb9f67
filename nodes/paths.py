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


PARTIAL_SUFFIX = ".partial.safetensors"  # what an interrupted SPM Train Membrane leaves behind

# path -> ((size, mtime_ns), is an SPM file): /object_info lists the membranes on every call, and
# reading a thousand LoRA headers each time took a second; a stat per file is what stays.
_tagged_cache: dict[str, tuple[tuple[int, int], bool]] = {}


def membrane_choices() -> list[str]:
    """Files of `models/spm`, then `models/loras` files whose metadata marks them as SPM membranes;
    never a training run's unfinished `.partial.safetensors` (SPM Train Membrane resumes it by name)."""
    choices = [name for name in folder_paths.get_filename_list(FOLDER) if _offered(name)]
    for name in folder_paths.get_filename_list("loras"):
        if _offered(name) and _tagged_as_spm(folder_paths.get_full_path("loras", name)):
            choices.append(LORA_PREFIX + name)
    return choices


def _tagged_as_spm(path: str | None) -> bool:
    """Whether a LoRA file's metadata marks it as an SPM membrane; read again only when the file's
    size or modification time changed."""
    try:
        stat = os.stat(path)
    except (OSError, TypeError):
        return False
    version = (stat.st_size, stat.st_mtime_ns)
    cached = _tagged_cache.get(path)
    if cached is None or cached[0] != version:
        cached = _tagged_cache[path] = (version, any(k in _header_metadata(path) for k in SPM_METADATA_KEYS))
    return cached[1]


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
