"""Where membrane files live: `models/spm` (registered as a model folder, so extra_model_paths.yaml
can add more under the name `spm`) and SPM files that people keep in `models/loras`."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import folder_paths

from ..spm_core.errors import SPMError

FOLDER = "spm"
LORA_PREFIX = "loras/"
SPM_METADATA_KEYS = ("spm_format", "prompts", "concepts")
T = TypeVar("T")


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
RACY_NS = 2 * 10**9  # a file changed this recently may change again within the same timestamp tick


class FileCache(Generic[T]):
    """A value computed from a file, computed again whenever the file may have changed.

    Keyed by device, inode, size, mtime and ctime: a file replaced in place with its size and
    mtime kept (cp -p) has a new ctime, which no tool can set back, and one a sync tool renames
    into place has a new inode. A value read within RACY_NS of the file's last change is not
    kept, since a second change within the same timestamp tick would keep every field of the key
    (git treats its racily clean index entries the same way)."""

    def __init__(self, compute: Callable[[str], T]) -> None:
        self._compute = compute
        self._entries: dict[str, tuple[tuple[int, ...], T]] = {}

    def get(self, path: str) -> T:
        stat = os.stat(path)
        key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        entry = self._entries.get(path)
        if entry is not None and entry[0] == key:
            return entry[1]
        value = self._compute(path)
        if time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) >= RACY_NS:
            self._entries[path] = (key, value)
        else:
            self._entries.pop(path, None)
        return value


def _is_spm_file(path: str) -> bool:
    return any(k in _header_metadata(path) for k in SPM_METADATA_KEYS)


def _sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# /object_info lists the membranes on every call, and reading a thousand LoRA headers each time
# took a second; the Load node's fingerprint would hash every membrane of a chain on every queue.
_spm_tags: FileCache[bool] = FileCache(_is_spm_file)
_content_hashes: FileCache[str] = FileCache(_sha256)


def membrane_choices() -> list[str]:
    """Files of `models/spm`, then `models/loras` files whose metadata marks them as SPM membranes;
    never a training run's unfinished `.partial.safetensors` (SPM Train Membrane resumes it by name)."""
    choices = [name for name in folder_paths.get_filename_list(FOLDER) if _offered(name)]
    for name in folder_paths.get_filename_list("loras"):
        if _offered(name) and _tagged_as_spm(folder_paths.get_full_path("loras", name)):
            choices.append(LORA_PREFIX + name)
    return choices


def _tagged_as_spm(path: str | None) -> bool:
    """Whether a LoRA file's metadata marks it as an SPM membrane (read again when the file changed)."""
    try:
        return _spm_tags.get(path)
    except (OSError, TypeError):
        return False


def content_key(choice: str) -> str:
    """The SHA-256 of a membrane file's bytes (hashed again when the file changed): what SPM Load
    Membrane's result depends on, so ComfyUI reloads a membrane replaced under the same name."""
    return _content_hashes.get(membrane_path(choice))


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
    """A file name (without extension) a user typed, checked so it cannot leave its folder, lands
    under the name typed, and is listed by SPM Load Membrane."""
    stem = name.strip().removesuffix(".safetensors")
    if not re.fullmatch(r"[\w\-. ]{1,120}", stem) or stem.startswith("."):
        raise ValueError(f"file name {name!r} is not allowed; use letters, digits, '-', '_' and '.'")
    if stem.endswith((".", " ")):
        raise ValueError(f"file name {name!r} is not allowed: it ends with {stem[-1]!r}, which some systems drop from "
                         "file names; end it with a letter or digit")
    if (stem + ".safetensors").lower().endswith(PARTIAL_SUFFIX):
        raise ValueError(f"file name {name!r} is not allowed: names ending in '.partial' are SPM Train Membrane's "
                         "unfinished runs, which SPM Load Membrane does not list; choose another name")
    return stem


def refuse_to_replace(path: str, overwrite: bool, alternative: str = "") -> None:
    """A clear error instead of silently replacing a user's file."""
    if os.path.exists(path) and not overwrite:
        raise SPMError(f"{path} already exists; choose another name, or switch 'overwrite' on to replace it{alternative}")
