"""Shared test helpers: random membranes for a ComfyUI model, module lookup, model calls."""

from __future__ import annotations

import torch

from spm_core.concepts import Concept
from spm_core.file_format import DIFFUSERS_LAYER
from spm_core.membrane import LayerWeights, Membrane
from spm_core.stack import module_shape


def key_map_of(patcher) -> dict[str, str]:
    """lora file name -> model module key (without '.weight'), from ComfyUI's own key mapping."""
    import comfy.lora

    mapped = comfy.lora.model_lora_keys_unet(patcher.model, {})
    return {name: key[: -len(".weight")] for name, key in mapped.items() if DIFFUSERS_LAYER.match(name)}


def modules_of(patcher, key_map: dict[str, str]) -> dict[str, torch.nn.Module]:
    return {key: patcher.model.get_submodule(key) for key in set(key_map.values())}


def shapes_of(modules: dict[str, torch.nn.Module]) -> dict[str, tuple[int, int, bool]]:
    return {key: module_shape(module) for key, module in modules.items()}


def random_membrane(key_map: dict[str, str], modules: dict[str, torch.nn.Module], seed: int, target: str = "snoopy",
                    rank: int = 1, alpha: float = 1.0, std: float = 0.3) -> Membrane:
    """A membrane on every SPM layer of the model with random (non-zero) down and up."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, key in sorted(key_map.items()):
        out_features, in_features, conv = module_shape(modules[key])
        layers[name] = LayerWeights(
            down=torch.randn(rank, in_features, generator=generator) * std,
            up=torch.randn(out_features, rank, generator=generator) * std,
            alpha=alpha, conv=conv)
    return Membrane(name=f"{target}-{seed}", concepts=(Concept(target),), layers=layers, architecture="sd1",
                    metadata={"source": f"{target}-{seed}.safetensors"})


LONG_CONCEPT = " ".join(["lighthouse"] * 90)  # 450 characters: within the text limit, over one CLIP chunk
BROKEN_MEMBRANES = {  # file in models/spm -> what the user must read about it
    "truncated.safetensors": "truncated.safetensors: not a readable safetensors file",
    "nudity.pt": "nudity.pt: pickled checkpoints are not loaded",
    "huge.safetensors": "so the file is damaged or was scaled by mistake",
    "nan_weights.safetensors": "weights contain NaN or inf; the file is damaged",
    "wrong_shapes.safetensors": "it does not fit this model",
    "no_concepts.safetensors": "no_concepts.safetensors: a membrane has no concepts",
    "contradiction.safetensors": "metadata 'prompts' ('snoopy') contradicts 'concepts'",
    "long_concept.safetensors": "is longer than one CLIP chunk (75 tokens)",
}


def write_broken_membranes(folder, good: str = "snoopy.safetensors") -> None:
    """The files of BROKEN_MEMBRANES in `folder`, each made from the good membrane `good` there and
    wrong in one way (what a user might drop into models/spm)."""
    import json
    import os

    import safetensors
    import safetensors.torch

    path = os.path.join(folder, good)
    with open(path, "rb") as handle:
        raw = handle.read()
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(path, "pt") as handle:
        metadata = handle.metadata()

    def write(name: str, new_tensors: dict, **new_metadata) -> None:
        safetensors.torch.save_file(new_tensors, os.path.join(folder, name), metadata={**metadata, **new_metadata})

    with open(os.path.join(folder, "truncated.safetensors"), "wb") as handle:
        handle.write(raw[: len(raw) // 2])
    with open(os.path.join(folder, "nudity.pt"), "wb") as handle:
        handle.write(b"not even a pickle")
    write("huge.safetensors", {k: v if k.endswith(".alpha") else v * 1e15 for k, v in tensors.items()})
    write("nan_weights.safetensors", {k: v * float("nan") if k.endswith("lora_up.weight") else v for k, v in tensors.items()})
    write("wrong_shapes.safetensors", {k: v[:, : v.shape[1] // 2].contiguous() if k.endswith("lora_down.weight") else v
                                       for k, v in tensors.items()})
    write("no_concepts.safetensors", tensors, concepts="[]", prompts="")
    write("contradiction.safetensors", tensors, concepts="[]", prompts="snoopy")
    write("long_concept.safetensors", tensors, concepts=json.dumps([{"target": LONG_CONCEPT}]), prompts=LONG_CONCEPT)
