"""Test and demo assets, generated (never committed): a reduced SD1.5 checkpoint that ComfyUI's
CheckpointLoaderSimple detects as SD1.5, and random membranes that fit it.

Detection needs model_channels 320, a 768-wide cross-attention, conv proj_in, 4 input channels and
no label_emb; depth can be cut to one level. The text encoder must be full CLIP-L (its config is
fixed), so the file is ~290 MiB; it is cached under ~/.cache/spm-test-assets.

The shipped Flux workflow runs on the miniature DiT instead of Flux.1-dev (lab/comfy_server.py:
for_test_models); its membrane is a random one bound to the miniature DiT's membrane layers.

usage: python -m lab.tiny_assets COMFYUI_ROOT MODELS_DIR
  -> MODELS_DIR/checkpoints/tiny-sd15.safetensors (a link to the cached file)
     MODELS_DIR/spm/{snoopy,mickey_mouse,van_gogh}.safetensors (SD1.5)
     MODELS_DIR/spm/pikachu.safetensors (Flux: the miniature DiT)
"""

from __future__ import annotations

import json
import os
import sys

from .host import use_host

CHECKPOINT = "tiny-sd15.safetensors"
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "spm-test-assets")
CHECKPOINT_VERSION = "v1"
MEMBRANES = {"snoopy": 11, "mickey mouse": 12, "van gogh": 13}
FLUX_MEMBRANES = {"pikachu": 14}  # the membrane the shipped Flux workflow names
UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}


def randomize_(module, seed: int, std: float = 0.02, bias_std: float = 0.0):
    """Deterministic values for a module ComfyUI built with uninitialised (torch.empty) weights:
    norms weight 1 / bias 0, other weights N(0, std), biases N(0, bias_std) (0: zero)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            is_norm = isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm))
            for name, param in sub.named_parameters(recurse=False):
                if is_norm:
                    param.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias" and not bias_std:
                    param.zero_()
                else:
                    scale = bias_std if name == "bias" else std
                    param.copy_((torch.randn(param.shape, generator=generator) * scale).to(param.dtype))
    return module


def checkpoint_state_dict() -> dict:
    """Original-layout SD1.5 keys: reduced UNet, full CLIP-L, TAESD VAE; random, deterministic."""
    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.taesd.taesd
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.set_grad_enabled(False)
    config = comfy.supported_models.SD15(dict(UNET)).unet_config
    unet = randomize_(UNetModel(**config, device="cpu", operations=comfy.ops.disable_weight_init), seed=0)
    state = {"model.diffusion_model." + k: v.half() for k, v in unet.state_dict().items()}
    with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")) as handle:
        clip_config = json.load(handle)
    text = comfy.clip_model.CLIPTextModel(clip_config, dtype=torch.float32, device="cpu",
                                          operations=comfy.ops.disable_weight_init)
    randomize_(text, seed=1)
    for k, v in text.state_dict().items():
        if k.startswith("text_model."):
            state["cond_stage_model.transformer." + k] = v.half()
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    vae = randomize_(comfy.taesd.taesd.TAESD(), seed=2, std=0.1)
    for name in ("vae_scale", "vae_shift"):
        if hasattr(vae, name):
            getattr(vae, name).fill_(1.0 if name == "vae_scale" else 0.0)
    state.update({"first_stage_model." + k: v.float() for k, v in vae.state_dict().items()})
    return {k: v.contiguous() for k, v in state.items()}


def cached_checkpoint() -> str:
    import comfy.utils

    path = os.path.join(CACHE, f"tiny-sd15-{CHECKPOINT_VERSION}.safetensors")
    if not os.path.isfile(path):
        os.makedirs(CACHE, exist_ok=True)
        partial = path + ".partial"
        comfy.utils.save_torch_file(checkpoint_state_dict(), partial)
        os.replace(partial, path)
    return path


def write_membranes(folder: str, concepts: dict[str, int] = MEMBRANES) -> list[str]:
    """Random rank-1 membranes on every SPM layer of the tiny checkpoint's UNet."""
    import comfy.supported_models

    from spm_core.file_format import DIFFUSERS_LAYER

    model = comfy.supported_models.SD15(dict(UNET)).get_model({}, device="meta")
    return _write_random_membranes(folder, model, DIFFUSERS_LAYER, "sd1", concepts,
                                   "random weights for tests and the demo, not a trained eraser")


def write_flux_membranes(folder: str, concepts: dict[str, int] = FLUX_MEMBRANES) -> list[str]:
    """Random rank-1 membranes (architecture flux) on every membrane layer of the miniature DiT: txt_in and
    the text stream of its double blocks, the layers nodes.architectures.membrane_layers binds on Flux."""
    import comfy.supported_models

    from miniworld.dit import FLUX_CONFIG
    from spm_core.file_format import FLUX_LAYER

    model = comfy.supported_models.Flux(dict(FLUX_CONFIG)).get_model({}, device="meta")
    return _write_random_membranes(folder, model, FLUX_LAYER, "flux", concepts,
                                   "random weights on the miniature DiT for tests, not a trained eraser")


def _write_random_membranes(folder: str, model, layer_pattern, architecture: str, concepts: dict[str, int],
                            note: str) -> list[str]:
    """One random rank-1 membrane per concept (seeded by its value) on the layers of `model` (a meta-device
    ComfyUI model) whose LoRA names match `layer_pattern`; returns the file names written in `folder`."""
    import comfy.lora
    import torch

    from spm_core.concepts import Concept
    from spm_core.file_format import save_membrane
    from spm_core.membrane import LayerWeights, Membrane
    from spm_core.stack import module_shape

    key_map = {n: k[: -len(".weight")] for n, k in comfy.lora.model_lora_keys_unet(model, {}).items()
               if isinstance(k, str) and layer_pattern.match(n)}
    os.makedirs(folder, exist_ok=True)
    written = []
    for target, seed in concepts.items():
        generator = torch.Generator().manual_seed(seed)
        layers = {}
        for name, key in sorted(key_map.items()):
            out_features, in_features, conv = module_shape(model.get_submodule(key))
            layers[name] = LayerWeights(down=torch.randn(1, in_features, generator=generator) * 0.5,
                                        up=torch.randn(out_features, 1, generator=generator) * 0.05, alpha=1.0, conv=conv)
        file_name = target.replace(" ", "_") + ".safetensors"
        membrane = Membrane(name=target, concepts=(Concept(target),), layers=layers, architecture=architecture)
        save_membrane(os.path.join(folder, file_name), membrane, training={"note": note})
        written.append(file_name)
    return written


def install_assets(models_dir: str) -> None:
    checkpoints = os.path.join(models_dir, "checkpoints")
    os.makedirs(checkpoints, exist_ok=True)
    link = os.path.join(checkpoints, CHECKPOINT)
    if not os.path.exists(link):
        os.symlink(cached_checkpoint(), link)
    write_membranes(os.path.join(models_dir, "spm"))
    write_flux_membranes(os.path.join(models_dir, "spm"))


if __name__ == "__main__":
    use_host(sys.argv[1])
    target = os.path.abspath(sys.argv[2])
    install_assets(target)
    print(f"assets ready in {target}")
