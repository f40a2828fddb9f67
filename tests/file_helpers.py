"""Membrane and LoRA files for the file format tests (docs/architecture.md, "Files"), written with
safetensors directly. `TinyModel` gives the shapes of a tiny UNet built from ComfyUI's own classes,
so the layer names are the ones ComfyUI's LoRA key map really has (it needs the host); the rest
needs spm_core alone."""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest
import torch
from safetensors.torch import save_file

from spm_core.concepts import Concept
from spm_core.errors import SPMFileError
from spm_core.file_format import DIFFUSERS_LAYER, load_membrane
from spm_core.membrane import LayerWeights, Membrane
from spm_core.stack import module_shape

PUBLIC_METADATA = {"prompts": "snoopy, mickey", "rank": "1", "alpha": "1.0"}
CONV_LAYERS = ("proj_in", "proj_out")
RESNET = "lora_unet_down_blocks_0_resnets_0_conv1"
TEXT_ENCODER = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


class TinyModel:
    """A tiny UNet, its ComfyUI LoRA key map, and the shapes of its SPM layers."""

    def __init__(self, arch: str, context: int) -> None:
        import comfy.lora
        from tiny_models import build_patcher

        self.arch = arch
        self.patcher = build_patcher(arch, context=context)
        self.key_map = comfy.lora.model_lora_keys_unet(self.patcher.model, {})
        self.layer_names = sorted(name for name in self.key_map if DIFFUSERS_LAYER.match(name))
        self.state_dict = self.patcher.model.state_dict()
        # file layer name -> weight shape in the model (4-D for 1x1 convs)
        self.weight_shapes = {name: tuple(self.state_dict[self.key_map[name]].shape) for name in self.layer_names}
        membrane_keys = {self.key_map[name] for name in self.layer_names}
        self.module_shapes = {}
        for path, module in self.patcher.model.diffusion_model.named_modules():
            key = f"diffusion_model.{path}.weight"
            if key in membrane_keys:
                self.module_shapes[key] = module_shape(module)


def lora_tensors(weight_shapes: Mapping[str, tuple[int, ...]], rank: int = 1, alpha: float = 1.0, seed: int = 0,
                 dtype: torch.dtype = torch.float32, with_alpha: bool = True) -> dict[str, torch.Tensor]:
    """Public-SPM / kohya tensors for every layer: conv layers get (r, in, 1, 1) / (out, r, 1, 1)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in weight_shapes.items():
        out_features, in_features = shape[0], shape[1]
        down = torch.randn(rank, in_features, generator=generator)
        up = torch.randn(out_features, rank, generator=generator)
        if len(shape) == 4:
            down, up = down[:, :, None, None], up[:, :, None, None]
        tensors[name + ".lora_down.weight"] = down.to(dtype).contiguous()
        tensors[name + ".lora_up.weight"] = up.to(dtype).contiguous()
        if with_alpha:
            tensors[name + ".alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return tensors


def write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


def write_public(path: str | os.PathLike, model: TinyModel, metadata: Mapping[str, str] = PUBLIC_METADATA, rank: int = 1,
                 alpha: float = 1.0, **kwargs) -> str:
    return write(path, lora_tensors(model.weight_shapes, rank=rank, alpha=alpha, **kwargs), dict(metadata))


def expect_file_error(path: str | os.PathLike, *phrases: str) -> str:
    """load_membrane(path) must raise SPMFileError naming the file (once) and each phrase."""
    with pytest.raises(SPMFileError) as caught:
        load_membrane(path)
    message = str(caught.value)
    assert message.count(str(path)) == 1, message
    for phrase in phrases:
        assert phrase.lower() in message.lower(), f"{phrase!r} not in {message!r}"
    assert caught.value.path == str(path)
    return message


def some_layer(model: TinyModel, suffix: str) -> str:
    return next(name for name in model.layer_names if name.endswith(suffix))


ODD_CONCEPTS = (
    Concept("snoopy", aliases=("peanuts dog", "Snoopy the beagle")),
    Concept("Pokémon, Pikachu ⚡", surrogate="a yellow cartoon mouse"),
    Concept("千と千尋の神隠し", neutral="an anime film"),
    Concept("wonder woman", surrogate="gal gadot", neutral="a woman", aliases=("diana prince",)),
)
BASE_MODEL = {"name": "tiny-sd1 ✓", "sha256": "0123abcd" * 8}
TRAINING = {"iterations": 3000, "lr": 1e-4, "rank": 2, "anchor": {"lambda": 1000.0, "sampler": "token-embeddings"},
            "prompts": ["Pokémon, Pikachu ⚡", "千と千尋の神隠し"], "fp32": True, "note": None}


def random_membrane(model: TinyModel, concepts: tuple[Concept, ...] = ODD_CONCEPTS, rank: int = 2, seed: int = 11,
                    per_layer_alpha: bool = False, metadata: dict | None = None) -> Membrane:
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for index, (name, shape) in enumerate(model.weight_shapes.items()):
        alpha = 0.5 + index if per_layer_alpha else 1.0
        layers[name] = LayerWeights(down=torch.randn(rank, shape[1], generator=generator),
                                    up=torch.randn(shape[0], rank, generator=generator),
                                    alpha=alpha, conv=len(shape) == 4)
    return Membrane(name="made", concepts=concepts, layers=layers, architecture=model.arch, metadata=metadata or {})


def assert_same_layers(loaded: Membrane, original: Membrane) -> None:
    assert sorted(loaded.layers) == sorted(original.layers)
    for name, layer in original.layers.items():
        back = loaded.layers[name]
        assert torch.equal(back.down, layer.down), name
        assert torch.equal(back.up, layer.up), name
        assert back.alpha == layer.alpha and back.conv is layer.conv, name


def lora_pair(name: str, out_features: int = 32, in_features: int = 32, rank: int = 1) -> dict[str, torch.Tensor]:
    return {name + ".lora_down.weight": torch.ones(rank, in_features),
            name + ".lora_up.weight": torch.ones(out_features, rank),
            name + ".alpha": torch.tensor(1.0)}
