"""The miniature diffusion transformer: the same world drawn by a tiny Flux.1, built from ComfyUI's
own classes (issue 17's miniature DiT world).

- Transformer: ComfyUI's `comfy.model_base.Flux` around `comfy.ldm.flux.model.Flux`, 128 wide, 4
  heads, 2 double and 2 single blocks, patch 2, flow matching with Flux's own model sampling (shift
  1.15). No guidance embedding: it is trained with 10% empty captions and sampled with CFG, as the
  undistilled Flux derivatives are (a negative row per prompt, like Chroma).
  Its latent is 16 x 16 x 16 like a Flux latent of a 128 px image (64 image tokens); channels 0-2
  hold the picture's RGB in [-1, 1] (model space, after Flux's latent format), the rest are zero.
- Text encoders: ComfyUI's `FluxClipModel`, a 2-layer 128-wide T5 (the real T5 sentencepiece
  tokenizer, prompts padded to 32 tokens instead of 256 through ComfyUI's `t5xxl_min_length`
  tokenizer option) for the text stream, and a 2-layer 64-wide CLIP-L (the real CLIP tokenizer) for
  the pooled vector. Both token embeddings are frozen random, regenerated from a seed, not stored.
- VAE: the UNet world's `PixelVAE` with Flux's latent format and 16 channels.

Sampling needs no patch (the UNet world's `CenteredSampling`): flow matching starts from pure noise.
"""

from __future__ import annotations

import os

import torch

from .model import WEIGHTS_DIR, PixelVAE, encode_token_embeddings, is_frozen

MODEL_FILE = os.path.join(WEIGHTS_DIR, "miniworld_dit.safetensors")

FLUX_CONFIG = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 64, "context_in_dim": 128,
    "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 4, "depth": 2, "depth_single_blocks": 2,
    "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": False,
}
T5_CONFIG = {"d_model": 128, "d_ff": 256, "d_kv": 32, "num_heads": 4, "num_layers": 2}
CLIP_CONFIG = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2, "num_hidden_layers": 2,
               "projection_dim": 64}
T5_TOKENS = 32  # T5 prompt length (Flux pads to 256; the captions here are at most a dozen tokens)
TOKENIZER_DATA = {"t5xxl_min_length": T5_TOKENS}
T5_EMBEDDING_SEED, CLIP_EMBEDDING_SEED = 20261203, 20261204
# Flux's latent format (comfy.latent_formats.Flux): model space = (latent - shift) x scale
LATENT_SCALE, LATENT_SHIFT = 0.3611, 0.1159
CHANNELS = 16
DIT_PREFIX, T5_PREFIX, CLIP_PREFIX = "dit.", "t5.", "clip_l."


def build_dit():
    """An uninitialised miniature Flux as a ComfyUI `comfy.model_base.Flux` (weights are torch.empty)."""
    import comfy.supported_models

    return comfy.supported_models.Flux(dict(FLUX_CONFIG)).get_model({})


def build_clip(embedding_directory: str | list[str] | None = None):
    """ComfyUI's Flux text encoders (CLIP-L and T5) at the miniature sizes, token embeddings set,
    the rest empty; T5 prompts padded to T5_TOKENS."""
    import comfy.sd
    import comfy.supported_models

    target = comfy.supported_models.Flux(dict(FLUX_CONFIG)).clip_target()
    options = {"dtype": torch.float32, "clip_l_model_config": dict(CLIP_CONFIG), "t5xxl_model_config": dict(T5_CONFIG)}
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, tokenizer_data=dict(TOKENIZER_DATA),
                         model_options=options)
    with torch.no_grad():
        t5(clip).shared.weight.copy_(token_embedding(T5_EMBEDDING_SEED, t5(clip).shared.weight.shape))
        clip_l = clip_l_transformer(clip)
        clip_l.text_model.embeddings.token_embedding.weight.copy_(
            token_embedding(CLIP_EMBEDDING_SEED, clip_l.text_model.embeddings.token_embedding.weight.shape))
    return clip


def t5(clip) -> torch.nn.Module:
    """ComfyUI's T5 (comfy.text_encoders.t5.T5) inside the Flux CLIP."""
    return clip.cond_stage_model.t5xxl.transformer


def clip_l_transformer(clip) -> torch.nn.Module:
    return clip.cond_stage_model.clip_l.transformer


def token_embedding(seed: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def is_frozen_text(name: str) -> bool:
    """Text-encoder parameters that are not trained (and not stored): both token embeddings and
    CLIP's projection (unused: Flux reads CLIP-L's pooled vector unprojected)."""
    return name == "shared.weight" or is_frozen(name)


def init_for_training_(module: torch.nn.Module, seed: int) -> None:
    """An initialisation for every parameter ComfyUI's ops leave empty, from `seed`: PyTorch's
    default for Linears and LayerNorms, ones for the other norms' scales, N(0, 0.02) for position
    and relative-position embeddings (token embeddings are set by build_clip)."""
    torch.manual_seed(seed)
    done = set()
    for sub in module.modules():
        for base in (torch.nn.Linear, torch.nn.LayerNorm):
            if isinstance(sub, base):  # ComfyUI's ops subclass these with a reset that does nothing
                base.reset_parameters(sub)
                done.update(id(p) for p in sub.parameters(recurse=False))
    with torch.no_grad():
        for name, p in module.named_parameters():
            if id(p) in done or is_frozen_text(name):
                continue
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                torch.nn.init.normal_(p, std=0.02)


def encode_t5(clip, ids: torch.Tensor) -> torch.Tensor:
    """T5's last hidden state for token ids (B, T5_TOKENS), with gradients: the computation of
    ComfyUI's T5Stack (pre-norm blocks, relative position bias from the first block, no attention
    mask as Flux's T5 uses none) with out-of-place residual adds, which autograd needs (ComfyUI's
    blocks add in place). A test checks both give the same output."""
    return encode_t5_embeddings(clip, t5(clip).shared(ids))


def encode_t5_embeddings(clip, tokens: torch.Tensor) -> torch.Tensor:
    from comfy.ldm.modules.attention import optimized_attention_for_device

    stack = t5(clip).encoder
    attention = optimized_attention_for_device(tokens.device, mask=False, small_input=True)
    x, bias = tokens, None
    for block in stack.block:
        attend, feed = block.layer[0], block.layer[-1]
        update, bias = attend.SelfAttention(attend.layer_norm(x), mask=None, past_bias=bias, optimized_attention=attention)
        x = x + update
        x = x + feed.DenseReluDense(feed.layer_norm(x))
    return stack.final_layer_norm(x)


def pooled_clip(clip, ids: torch.Tensor) -> torch.Tensor:
    """CLIP-L's pooled vector (the final hidden state at the end token, unprojected, as Flux reads
    it) for token ids (B, 77), with gradients."""
    hidden = encode_token_embeddings(clip, clip_l_transformer(clip).text_model.embeddings.token_embedding(ids))
    end = ids.argmax(dim=-1)  # the end token (49407) has the largest id
    return hidden[torch.arange(ids.shape[0]), end]


def token_ids(clip, text: str) -> tuple[list[int], list[int]]:
    """(T5 ids, CLIP-L ids) ComfyUI's CLIPTextEncode feeds the encoders for a short prompt."""
    tokens = clip.tokenize(text)
    return [t for t, _ in tokens["t5xxl"][0]], [t for t, _ in tokens["l"][0]]


def text_state(clip) -> dict[str, torch.Tensor]:
    state = {T5_PREFIX + k: v for k, v in t5(clip).state_dict().items() if not is_frozen_text(k)}
    state.update({CLIP_PREFIX + k: v for k, v in clip_l_transformer(clip).state_dict().items() if not is_frozen_text(k)})
    return state


def model_state(dit_model, clip) -> dict[str, torch.Tensor]:
    """What is shipped: the transformer and the trained text-encoder parameters, prefixed."""
    state = {DIT_PREFIX + k: v for k, v in dit_model.diffusion_model.state_dict().items()}
    state.update(text_state(clip))
    return state


def load_model_state(dit_model, clip, state: dict[str, torch.Tensor]) -> None:
    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}

    dit_model.diffusion_model.load_state_dict(part(DIT_PREFIX), strict=True)
    for prefix, module in ((T5_PREFIX, t5(clip)), (CLIP_PREFIX, clip_l_transformer(clip))):
        missing, unexpected = module.load_state_dict(part(prefix), strict=False)
        if unexpected or any(not is_frozen_text(k) for k in missing):
            raise ValueError(f"miniature DiT text encoder weights do not match: missing {missing}, unexpected {unexpected}")


def load_world(path: str = MODEL_FILE, embedding_directory: str | list[str] | None = None):
    """(MODEL ModelPatcher, CLIP, PixelVAE) for the shipped miniature DiT."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import safetensors.torch

    dit_model, clip = build_dit(), build_clip(embedding_directory)
    load_model_state(dit_model, clip, safetensors.torch.load_file(path))
    dit_model.eval()
    patcher = comfy.model_patcher.ModelPatcher(dit_model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    return patcher, clip, PixelVAE(channels=CHANNELS, scale=LATENT_SCALE, shift=LATENT_SHIFT)
