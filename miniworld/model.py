"""The miniature text-to-image model, built from ComfyUI's own classes.

- UNet: ComfyUI's SD1.5 `BaseModel` (`comfy.supported_models.SD15`) cut down to model_channels 32,
  channel_mult (1, 2, 2), one res block per level, cross-attention at 8x8, 4x4 and the middle,
  context 128. Its latent is 4 x 16 x 16 like an SD1 latent of a 128 px image; channels 0-2 hold the
  picture's RGB in [-1, 1] (model space), channel 3 is zero.
- Text encoder: ComfyUI's SD1 `comfy.sd.CLIP` (the real CLIP BPE tokenizer) with a 2-layer,
  128-wide, 4-head `clip_l`. Its 49408 x 128 token embedding is frozen random, regenerated from a
  seed rather than stored.
- VAE: `PixelVAE`, the identity between the latent's RGB channels and the picture, upscaled 8x
  (nearest) so a 16 x 16 picture is seen at 128 x 128 and EmptyLatentImage(128, 128) fits.
- Sampling: `CenteredSampling`, SD1's own noise schedule and epsilon prediction with two facts of
  this world added where ComfyUI's samplers ask for them (an object patch, like the stock
  ModelSampling nodes): a sampler that starts from an empty (all-zero) latent starts from the
  world's mean colour with noise whose per-channel mean is removed, and channel 3 is always 0. A
  real latent (img2img, the kept region of inpainting, a two-stage run's leftover noise) is noised
  exactly as SD1 noises it. SD1's schedule ends at sigma 14.6, where
  a 16 x 16 picture's mean colour is still visible through the noise (its noise averages over 256
  pixels only); started from zero-mean noise alone, the model painted every picture in the colour
  cast of its noise.

Because it is an ordinary SD15 model to ComfyUI, SPM Load Membrane, SPM Train Membrane and the Inspector bind to it
through ComfyUI's own LoRA key map exactly as they do to Stable Diffusion 1.5.
"""

from __future__ import annotations

import math
import os

import torch

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
MODEL_FILE = os.path.join(WEIGHTS_DIR, "miniworld.safetensors")
CLASSIFIER_FILE = os.path.join(WEIGHTS_DIR, "classifier.safetensors")

UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 16, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 2, 2], "transformer_depth": [0, 1, 1], "transformer_depth_output": [0, 0, 1, 1, 1, 1],
    "transformer_depth_middle": 1, "context_dim": 128, "use_linear_in_transformer": False,
    "adm_in_channels": None, "use_temporal_resblock": False, "use_temporal_attention": False,
}
TEXT_CONFIG = {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 4, "num_hidden_layers": 2,
               "projection_dim": 128}
TOKEN_EMBEDDING_SEED = 20240601
LATENT_SCALE = 0.18215  # SD1's latent scale factor: model space = VAE latent x LATENT_SCALE
UPSCALE = 8
UNET_PREFIX, TEXT_PREFIX = "unet.", "text."
# Mean of the world's pictures in model space, per latent channel (miniworld.world renders, seed 0,
# 4000 pictures; tests/test_miniworld.py recomputes it).
DATA_MEAN = (-0.4998, -0.5510, -0.5783, 0.0)


def build_unet():
    """An uninitialised miniature UNet as a ComfyUI `BaseModel` (weights are torch.empty)."""
    import comfy.model_base
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(UNET_CONFIG))
    return comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS)


def build_clip(embedding_directory: str | list[str] | None = None):
    """A ComfyUI SD1 CLIP with the miniature text encoder; token embedding set, the rest empty.
    `embedding_directory`: where its tokenizer looks up `embedding:name` in prompts (None: such
    words are read as plain text)."""
    import comfy.sd
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(UNET_CONFIG))
    options = {"dtype": torch.float32, "clip_l_model_config": dict(TEXT_CONFIG)}
    clip = comfy.sd.CLIP(config.clip_target(), embedding_directory=embedding_directory, model_options=options)
    transformer = text_transformer(clip)
    with torch.no_grad():
        transformer.text_model.embeddings.token_embedding.weight.copy_(token_embedding())
        transformer.text_projection.weight.copy_(torch.eye(TEXT_CONFIG["projection_dim"], TEXT_CONFIG["hidden_size"]))
    return clip


def text_transformer(clip) -> torch.nn.Module:
    """ComfyUI's CLIPTextModel inside an SD1 CLIP."""
    return clip.cond_stage_model.clip_l.transformer


def token_embedding() -> torch.Tensor:
    generator = torch.Generator().manual_seed(TOKEN_EMBEDDING_SEED)
    return torch.randn(49408, TEXT_CONFIG["hidden_size"], generator=generator)


def is_frozen(name: str) -> bool:
    """Text-encoder parameters that are not trained (and not stored)."""
    return name.endswith("token_embedding.weight") or "text_projection" in name


def init_for_training_(module: torch.nn.Module, seed: int) -> None:
    """PyTorch's default initialisation for every layer (ComfyUI's ops skip it), from `seed`."""
    torch.manual_seed(seed)
    for sub in module.modules():
        for base in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(sub, base):
                base.reset_parameters(sub)
        if isinstance(sub, torch.nn.Embedding) and sub.num_embeddings == 77:
            torch.nn.init.normal_(sub.weight, std=0.02)


def model_state(unet_model, clip) -> dict[str, torch.Tensor]:
    """What is shipped: the UNet and the trained text-encoder parameters, prefixed."""
    state = {UNET_PREFIX + k: v for k, v in unet_model.diffusion_model.state_dict().items()}
    state.update({TEXT_PREFIX + k: v for k, v in text_transformer(clip).state_dict().items() if not is_frozen(k)})
    return state


def load_model_state(unet_model, clip, state: dict[str, torch.Tensor]) -> None:
    unet = {k[len(UNET_PREFIX):]: v.float() for k, v in state.items() if k.startswith(UNET_PREFIX)}
    text = {k[len(TEXT_PREFIX):]: v.float() for k, v in state.items() if k.startswith(TEXT_PREFIX)}
    unet_model.diffusion_model.load_state_dict(unet, strict=True)
    missing, unexpected = text_transformer(clip).load_state_dict(text, strict=False)
    if unexpected or any(not is_frozen(k) for k in missing):
        raise ValueError(f"miniature text encoder weights do not match: missing {missing}, unexpected {unexpected}")


def load_world(path: str = MODEL_FILE, embedding_directory: str | list[str] | None = None):
    """(MODEL ModelPatcher, CLIP, PixelVAE) for the shipped miniature model; the CLIP finds
    textual-inversion embeddings in `embedding_directory`."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import safetensors.torch

    state = safetensors.torch.load_file(path)
    unet_model = build_unet()
    clip = build_clip(embedding_directory)
    load_model_state(unet_model, clip, state)
    unet_model.eval()
    patcher = comfy.model_patcher.ModelPatcher(unet_model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    patcher.add_object_patch("model_sampling", centered_sampling(unet_model))
    return patcher, clip, PixelVAE()


def centered_sampling(unet_model):
    """SD1's model sampling for this model, with the world's mean colour and empty channel 3."""
    base = type(unet_model.model_sampling)
    mean = torch.tensor(DATA_MEAN).reshape(1, -1, 1, 1)

    class CenteredSampling(base):
        def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
            # An all-zero latent is ComfyUI's empty latent (its samplers leave it unshifted by the
            # latent format for that reason): only those items start from the mean with centred
            # noise. A real latent (img2img, inpainting, a later stage's leftover noise) is SD1's.
            empty = (latent_image == 0).flatten(1).all(dim=1).reshape(-1, *(1,) * (noise.ndim - 1))
            noise = torch.where(empty, noise - noise.mean(dim=(-2, -1), keepdim=True), noise)
            scaled = super().noise_scaling(sigma, noise, latent_image, max_denoise)
            return scaled + mean.to(scaled) * empty.to(scaled)

        def calculate_denoised(self, sigma, model_output, model_input):
            denoised = super().calculate_denoised(sigma, model_output, model_input)
            return torch.cat([denoised[:, :3], torch.zeros_like(denoised[:, 3:])], dim=1)

    return CenteredSampling(unet_model.model_config)


def encode_ids(clip, ids: torch.Tensor) -> torch.Tensor:
    """The text encoder's last hidden state for token ids (B, 77), with gradients.

    The same computation as ComfyUI's CLIPTextModel_.forward (causal mask, pre-norm layers, final
    layer norm), but with out-of-place residual adds: ComfyUI's CLIPLayer adds in place, which
    autograd cannot differentiate through. A test checks both give the same output."""
    return encode_token_embeddings(clip, text_transformer(clip).text_model.embeddings.token_embedding(ids))


def encode_token_embeddings(clip, tokens: torch.Tensor) -> torch.Tensor:
    """`encode_ids` from the token embeddings (B, 77, width) instead of the ids: what a textual
    inversion embedding feeds the encoder, and what the gradient attack optimises."""
    from comfy.ldm.modules.attention import optimized_attention_for_device

    text = text_transformer(clip).text_model
    length = tokens.shape[1]
    x = tokens + text.embeddings.position_embedding.weight[:length].to(tokens)
    mask = torch.full((length, length), -torch.finfo(x.dtype).max, dtype=x.dtype).triu_(1)
    attention = optimized_attention_for_device(x.device, mask=True, small_input=True)
    for layer in text.encoder.layers:
        x = x + layer.self_attn(layer.layer_norm1(x), mask, attention)
        x = x + layer.mlp(layer.layer_norm2(x))
    return text.final_layer_norm(x)


def token_ids(clip, text: str) -> list[int]:
    """The 77 token ids ComfyUI's CLIPTextEncode feeds the encoder for a short prompt."""
    return [token for token, _weight in clip.tokenize(text)["l"][0]]


def pictures_to_model_space(pictures: torch.Tensor, channels: int = 4) -> torch.Tensor:
    """(B, 3, 16, 16) RGB in [0, 1] -> (B, channels, 16, 16) model-space latent (the rest zero)."""
    rest = torch.zeros(pictures.shape[0], channels - 3, *pictures.shape[2:], dtype=pictures.dtype)
    return torch.cat([pictures * 2 - 1, rest], dim=1)


def model_space_to_pictures(latent: torch.Tensor) -> torch.Tensor:
    return ((latent[:, :3] + 1) / 2).clamp(0, 1)


class PixelVAE:
    """The VAE of the miniature worlds: latent channels 0-2 are the picture's RGB, in the latent
    format's space (model space = (latent - shift) x scale: SD1's by default, Flux's for the DiT
    world), upscaled 8x with nearest-neighbour. Enough of comfy.sd.VAE's interface for VAE Decode
    and VAE Encode."""

    downscale_ratio = UPSCALE
    upscale_ratio = UPSCALE
    output_channels = 3

    def __init__(self, channels: int = 4, scale: float = LATENT_SCALE, shift: float = 0.0) -> None:
        self.latent_channels, self.scale, self.shift = channels, scale, shift

    def pictures(self, samples: torch.Tensor) -> torch.Tensor:
        """The pictures (B, 3, 16, 16) in [0, 1] a latent holds, at their own size."""
        return model_space_to_pictures((samples.float() - self.shift) * self.scale)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        pictures = torch.nn.functional.interpolate(self.pictures(samples), scale_factor=UPSCALE, mode="nearest")
        return pictures.permute(0, 2, 3, 1).cpu()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pictures = pixels[..., :3].permute(0, 3, 1, 2).float()
        height, width = (math.ceil(s / UPSCALE) for s in pictures.shape[-2:])
        pictures = torch.nn.functional.adaptive_avg_pool2d(pictures, (height, width))
        return pictures_to_model_space(pictures, self.latent_channels) / self.scale + self.shift

    def spacial_compression_decode(self) -> int:
        return UPSCALE

    def spacial_compression_encode(self) -> int:
        return UPSCALE
