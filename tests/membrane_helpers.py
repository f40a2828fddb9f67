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
