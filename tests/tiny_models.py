"""Tiny SD1.5-, SD2- and SDXL-architecture models built from ComfyUI's own classes.

ComfyUI builds layers with `disable_weight_init` ops, so weights start as torch.empty()
garbage; `randomize_` gives every parameter a deterministic value from a seed.
"""

from __future__ import annotations

import torch

from lab import tiny_assets as assets

ARCH_CLASSES = {"sd1": "SD15", "sd2": "SD20", "sdxl": "SDXL"}


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Weights N(0, std), biases N(0, std / 10), norms (1, 0), all from `seed`."""
    return assets.randomize_(module, seed, std=std, bias_std=std * 0.1)


def unet_config(arch: str, width: int = 32, context: int = 32) -> dict:
    """A two-level UNet with one depth-1 transformer per attention stage. SD2 and SDXL fix 64
    channels per attention head, so their width should be a multiple of 64."""
    config = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "in_channels": 4, "out_channels": 4, "model_channels": width,
        "num_res_blocks": [1, 1], "channel_mult": [1, 2],
        "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
        "context_dim": context, "use_temporal_resblock": False, "use_temporal_attention": False,
        "use_linear_in_transformer": arch != "sd1", "adm_in_channels": None,
    }
    if arch == "sdxl":
        # SDXL conditions on the pooled clip_g output (context // 2 wide here) + 6 size embeddings
        config.update(adm_in_channels=context // 2 + 6 * 256, num_classes="sequential")
    return config


def model_config_for(arch: str, width: int = 32, context: int = 32):
    import comfy.supported_models

    return getattr(comfy.supported_models, ARCH_CLASSES[arch])(unet_config(arch, width, context))


def build_patcher(arch: str = "sd1", seed: int = 0, width: int | None = None, context: int = 32,
                  v_prediction: bool = False, prompt_gain: float = 1.0):
    """A ModelPatcher around a tiny random UNet of the given architecture. `prompt_gain` scales the
    cross-attention values, so that prompts change the prediction by a useful amount (random
    small weights leave a tiny model nearly deaf to its prompt)."""
    width = width or (32 if arch == "sd1" else 64)
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher

    config = model_config_for(arch, width, context)
    if arch == "sdxl":
        model = comfy.model_base.SDXL(config, model_type=comfy.model_base.ModelType.EPS)
    else:
        model_type = comfy.model_base.ModelType.V_PREDICTION if v_prediction else comfy.model_base.ModelType.EPS
        model = comfy.model_base.BaseModel(config, model_type=model_type)
    randomize_(model.diffusion_model, seed)
    with torch.no_grad():
        for name, module in model.diffusion_model.named_modules():
            if name.endswith("attn2.to_v"):
                module.weight.mul_(prompt_gain)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def tiny_text_config(width: int) -> dict:
    return {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 2,
            "num_hidden_layers": 3, "projection_dim": width}


def build_clip(arch: str = "sd1", seed: int = 1, width: int = 32):
    """A comfy.sd.CLIP with the real tokenizer and a tiny random text encoder.
    SDXL's two encoders are each `width // 2` wide so that the joint context is `width`."""
    import comfy.sd

    config = model_config_for(arch, context=width)
    options: dict = {"dtype": torch.float32}
    if arch == "sd1":
        options["clip_l_model_config"] = tiny_text_config(width)
    elif arch == "sd2":
        options["clip_h_model_config"] = tiny_text_config(width)
    else:
        options["clip_l_model_config"] = tiny_text_config(width // 2)
        options["clip_g_model_config"] = tiny_text_config(width // 2)
    clip = comfy.sd.CLIP(config.clip_target(), embedding_directory=None, model_options=options)
    randomize_(clip.cond_stage_model, seed, std=0.2)
    return clip


def flux_config(width: int = 32, text_width: int = 32, pooled_width: int = 32, depth: int = 2, single_depth: int = 1) -> dict:
    """A tiny Flux.1-dev: `width` wide with 2 heads (rotary axes 4 + 6 + 6 = 16 per head), `depth`
    double and `single_depth` single blocks, T5 text `text_width` wide, pooled CLIP-L `pooled_width`."""
    return {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": pooled_width,
            "context_in_dim": text_width, "hidden_size": width, "mlp_ratio": 2.0, "num_heads": 2, "depth": depth,
            "depth_single_blocks": single_depth, "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2,
            "qkv_bias": True, "guidance_embed": True}


def amplify_text_values_(diffusion_model: torch.nn.Module, gain: float) -> None:
    """Scale the values the text tokens give the joint attention of every double block (the last third
    of txt_attn.qkv), so that prompts change a tiny random DiT's prediction by a useful amount (as
    build_patcher's `prompt_gain` does for a UNet's cross-attention values)."""
    with torch.no_grad():
        for block in diffusion_model.double_blocks:
            qkv = block.txt_attn.qkv
            third = qkv.weight.shape[0] // 3
            qkv.weight[2 * third:].mul_(gain)
            qkv.bias[2 * third:].mul_(gain)


def build_flux_patcher(seed: int = 0, text_width: int = 32, std: float = 0.1, prompt_gain: float = 1.0,
                       weight_dtype: torch.dtype | None = None):
    """A ModelPatcher around a tiny random Flux.1 (comfy.model_base.Flux, comfy.ldm.flux.model.Flux).
    `weight_dtype` (e.g. torch.float8_e4m3fn): the weights stored in it and cast to fp32 per layer, as
    ComfyUI runs an fp8 checkpoint (the same random values, rounded)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    model = comfy.supported_models.Flux(flux_config(text_width=text_width)).get_model({})
    randomize_(model.diffusion_model, seed, std=std)
    amplify_text_values_(model.diffusion_model, prompt_gain)
    if weight_dtype is not None:
        config = comfy.supported_models.Flux(flux_config(text_width=text_width))
        config.set_inference_dtype(weight_dtype, torch.float32)
        stored = config.get_model({})
        stored.diffusion_model.load_state_dict(model.diffusion_model.state_dict())
        model = stored
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def build_flux_clip(seed: int = 1, width: int = 32):
    """Flux's text encoders (ComfyUI's FluxClipModel: CLIP-L and T5 XXL) with the real bundled
    tokenizers and tiny random weights: T5 `width` wide, CLIP-L `width` wide."""
    import comfy.sd
    import comfy.supported_models

    options = {"dtype": torch.float32, "clip_l_model_config": tiny_text_config(width),
               "t5xxl_model_config": {"d_model": width, "d_ff": 2 * width, "d_kv": 8, "num_heads": 4, "num_layers": 2}}
    target = comfy.supported_models.Flux(flux_config(text_width=width, pooled_width=width)).clip_target()
    clip = comfy.sd.CLIP(target, embedding_directory=None, model_options=options)
    randomize_(clip.cond_stage_model, seed, std=0.2)
    return clip


def build_chroma_patcher(seed: int = 0, std: float = 0.1, prompt_gain: float = 1.0):
    """A ModelPatcher around a tiny random Chroma (comfy.model_base.Chroma, comfy.ldm.chroma): Flux.1's
    double and single blocks (as flux_config) with the modulation from its small approximator network."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = {key: value for key, value in flux_config().items() if key not in ("vec_in_dim", "guidance_embed")}
    config.update(image_model="chroma", in_channels=64, out_channels=64, in_dim=64, out_dim=config["hidden_size"],
                  hidden_dim=64, n_layers=2)
    model = comfy.supported_models.Chroma(config).get_model({})
    randomize_(model.diffusion_model, seed, std=std)
    amplify_text_values_(model.diffusion_model, prompt_gain)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def build_chroma_clip(seed: int = 1, width: int = 32):
    """Chroma's text encoder (ComfyUI's PixArt T5 XXL: no padding) with the bundled tokenizer and tiny random weights."""
    import comfy.sd
    import comfy.supported_models

    options = {"dtype": torch.float32,
               "t5xxl_model_config": {"d_model": width, "d_ff": 2 * width, "d_kv": 8, "num_heads": 4, "num_layers": 2}}
    target = comfy.supported_models.Chroma({"image_model": "chroma"}).clip_target()
    clip = comfy.sd.CLIP(target, embedding_directory=None, model_options=options)
    randomize_(clip.cond_stage_model, seed, std=0.2)
    return clip
