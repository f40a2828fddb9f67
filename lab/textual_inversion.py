"""Textual inversion in the miniature world, used the way a ComfyUI user uses it.

An embedding of a few vectors is learned for "a <embedding>" with the diffusion loss against the
bare model's own pictures of the concept (standard textual inversion), either on the bare model or
against a membrane-equipped model with its gate differentiated through (adaptive: the attacker
knows the membrane); the optimiser is the gradient attack's (lab/attack.py). It is saved as a
safetensors embedding file in ComfyUI's embeddings folder and used as "a embedding:<name>" through
ComfyUI's own tokenizer, so what is measured is what a user with that file gets.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from .attack import AttackSettings, Optimised, optimise

EMBEDDING_KEY = "clip_l"  # the key ComfyUI's SD1 tokenizer looks an embedding file's vectors up by
SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors library's own limit on a header
TRAINING = AttackSettings()  # learned like the gradient attack: 150 Adam steps at lr 0.1, batches of 8


def settings_for(vectors: int, base: AttackSettings = TRAINING) -> AttackSettings:
    """`base` as textual inversion: `vectors` free tokens after "a", nothing after them."""
    return replace(base, soft_tokens=vectors, before="a", after="")


def learn_embedding(lab, concept: str, vectors: int, model=None, settings: AttackSettings = TRAINING) -> Optimised:
    """An embedding of `vectors` vectors for `concept`, learned on the bare model (model None) or
    against `model`, an SPM Load Membrane output (adaptive)."""
    return optimise(lab, lab.model if model is None else model, concept, settings_for(vectors, settings))


def save_embedding(path: str, vectors: torch.Tensor, metadata: dict[str, str] | None = None) -> str:
    """Writes `vectors` (count, width) as a ComfyUI embedding file; returns the name to write after
    "embedding:" in a prompt (the file name without its extension)."""
    import safetensors.torch

    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: embeddings are written as .safetensors files")
    safetensors.torch.save_file({EMBEDDING_KEY: vectors.detach().float().contiguous().cpu()}, path, metadata=metadata)
    return os.path.basename(path)[: -len(".safetensors")]


def load_embedding(path: str, width: int) -> torch.Tensor:
    """The vectors (count, width) of an embedding file, checked as ComfyUI will not check them: a
    file ComfyUI cannot use, or one of another width (which its encoder drops with only a log
    warning, leaving the word silently out of the prompt), is refused with an error naming it.
    Pickled files (.pt, .bin) are refused without being opened by a pickle reader."""
    import safetensors

    name = os.path.basename(path)
    with open(path, "rb") as handle:
        prefix = handle.read(9)
    header = int.from_bytes(prefix[:8], "little") if len(prefix) == 9 else 0
    if not (0 < header <= SAFETENSORS_HEADER_LIMIT and prefix[8:9] == b"{"):
        raise ValueError(f"{name}: not a safetensors embedding file (pickled .pt/.bin embeddings are not loaded; "
                         f"save it as .safetensors)")
    try:
        with safetensors.safe_open(path, "pt") as handle:
            keys = list(handle.keys())
            vectors = handle.get_tensor(EMBEDDING_KEY if EMBEDDING_KEY in keys else keys[0]) if keys else None
    except Exception as error:  # the safetensors library raises its own types for damaged files
        raise ValueError(f"{name}: not a readable safetensors embedding file ({error})") from error
    if vectors is None or vectors.ndim not in (1, 2):
        raise ValueError(f"{name}: holds no embedding vectors (a (count, width) tensor under {EMBEDDING_KEY!r})")
    vectors = vectors.reshape(-1, vectors.shape[-1])
    if vectors.shape[-1] != width:
        raise ValueError(f"{name}: its vectors are {vectors.shape[-1]} wide but this text encoder's tokens are "
                         f"{width} wide; it was made for another model")
    if not bool(torch.isfinite(vectors).all()):
        raise ValueError(f"{name}: the embedding holds NaN or inf; the file is damaged")
    return vectors.float()


def embedding_file(folder: str, name: str) -> str:
    """The file ComfyUI's tokenizer reads for `embedding:<name>` from `folder` (the name as it is, then
    with .safetensors, .pt, .bin); an error naming what was looked for where ComfyUI would only log
    a warning and leave the word out."""
    for candidate in (name, f"{name}.safetensors", f"{name}.pt", f"{name}.bin"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    raise ValueError(f"no embedding file {name}(.safetensors) in {folder}")


def embedding_prompt(lab, name: str) -> str:
    """The prompt "a embedding:<name>" for the embedding `name` in the lab's embeddings folder,
    after checking its file (load_embedding)."""
    from miniworld.model import TEXT_CONFIG

    load_embedding(embedding_file(lab.embedding_dir, name), TEXT_CONFIG["hidden_size"])
    return f"a embedding:{name}"
