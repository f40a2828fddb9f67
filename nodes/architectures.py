"""Which models take membranes, where a membrane binds in each, and where a prompt's words sit in
each text encoder's output.

Stable Diffusion 1.x / 2.x / XL UNets: the transformer blocks' Linears and 1x1 convolutions
(docs/architecture.md, the method). Flux.1 (comfy.ldm.flux) and Chroma (Flux.1's blocks): where the text enters, i.e.
txt_in and the text stream of every double block (txt_attn.qkv, txt_attn.proj, txt_mlp.0,
txt_mlp.2); each maps a (batch, text tokens, width) input row by row, so the per-row gate applies
as on a UNet, and no image token passes through them. Single blocks (linear1, linear2: one Linear
over the text tokens, then the image tokens) carry a membrane on their text tokens only; how many
lead comes from the last double block's text output (text_stream_blocks). Layer names and module
keys come from ComfyUI's own LoRA key map (comfy.lora.model_lora_keys_unet), which gives Flux's
original (BFL) module names the same `lora_unet_` names kohya's Flux LoRAs use.
"""

from __future__ import annotations

import comfy.lora
import comfy.model_base
import torch

from ..spm_core.errors import SPMError, SPMModelMismatch
from ..spm_core.file_format import UNET_ARCHITECTURES, is_membrane_layer, is_text_token_layer
from ..spm_core.membrane import Membrane
from ..spm_core.stack import module_shape
from ..spm_core.transport import LOOKING_AHEAD, Transport, TransportMode

UNET, FLUX = "Stable Diffusion UNet", "Flux"
FLUX_TEXT_INPUT = "lora_unet_txt_in"
SUPPORTED = "Stable Diffusion 1.x / 2.x / XL UNets, Flux.1 and Chroma"
# gates built on the flattened prompt cosine (the latent gate's text part is the calibrated one)
FLATTENED_PROMPT_MODES = (TransportMode.PAPER, TransportMode.COSINE, TransportMode.CALIBRATED, *LOOKING_AHEAD,
                          TransportMode.OFFICIAL)


def model_family(model) -> str | None:
    """UNET or FLUX for a ModelPatcher whose model takes membranes, else None."""
    base = model.model
    # Flux.1 dev / schnell / Fill / Kontext, and Chroma (Flux.1's double blocks and txt_in, T5 text);
    # not Flux2 (another text encoder and layout) nor Chroma Radiance (pixel space, untested)
    if type(base) in (comfy.model_base.Flux, comfy.model_base.Chroma):
        return FLUX
    if "context_dim" in base.model_config.unet_config and hasattr(base.diffusion_model, "input_blocks"):
        return UNET
    return None


def model_label(model) -> str:
    """The model as ComfyUI's model detection names it (SD15, SDXL, Flux, FluxSchnell, ...)."""
    return type(model.model.model_config).__name__


def membrane_family(membrane: Membrane) -> str | None:
    if membrane.architecture in UNET_ARCHITECTURES:
        return UNET
    return FLUX if membrane.architecture == "flux" else None


def text_width_of(model) -> int | None:
    """The width of the text conditioning the model reads (Flux: T5's, 4096; SD: CLIP's context)."""
    config = model.model.model_config.unet_config
    return config.get("context_in_dim") if model_family(model) == FLUX else config.get("context_dim")


def membrane_layers(model) -> tuple[dict[str, str], dict[str, tuple[int, int, bool]]]:
    """ComfyUI's own LoRA key map restricted to membrane layers (file layer name -> module key), and
    those modules' shapes. Refuses models that take no membranes, naming them."""
    family = model_family(model)
    key_map = {} if family is None else {
        name: key[: -len(".weight")] for name, key in comfy.lora.model_lora_keys_unet(model.model, {}).items()
        if isinstance(key, str) and (is_membrane_layer(name) or (family == FLUX and is_text_token_layer(name)))}
    if not key_map:
        raise SPMModelMismatch(f"{model_label(model)} ({type(model.model).__name__}) takes no membranes: SPM membranes "
                               f"apply to {SUPPORTED}")
    shapes = {key: module_shape(model.model.get_submodule(key)) for key in set(key_map.values())}
    return key_map, shapes


def text_stream_blocks(base_model) -> list[torch.nn.Module]:
    """The blocks whose output is (image tokens, text tokens), so that membranes on text tokens only
    learn how many text tokens lead the single blocks' input: Flux's last double block (its text
    stream is what the single blocks' input starts with). None on other models."""
    blocks = getattr(base_model.diffusion_model, "double_blocks", None)
    return [blocks[-1]] if isinstance(base_model, (comfy.model_base.Flux, comfy.model_base.Chroma)) and blocks else []


def check_membrane_fits(model, membrane: Membrane, transport: Transport | None = None) -> None:
    """Refuse, naming the membrane's file and the model, a membrane made for another family of
    models, a Flux membrane whose text input is of another width than the model's, concept
    embeddings (encoded by the gate's text encoder) of another width than the model reads, a gate
    the model's text encoder defeats: on Flux one that compares whole flattened prompts, on a UNet
    the token gate."""
    source = membrane.metadata.get("source", membrane.name)
    label = model_label(model)
    family, made_for = model_family(model), membrane_family(membrane)
    if family is None:
        raise SPMModelMismatch(f"{source}: {label} takes no membranes; SPM membranes apply to {SUPPORTED}")
    if made_for is not None and made_for != family:
        raise SPMModelMismatch(f"{source} is a {made_for} membrane ({membrane.architecture}) and the model is {label}, "
                               f"a {family}: a membrane only fits the family of models it was trained on")
    width = text_width_of(model)
    text_input = membrane.layers.get(FLUX_TEXT_INPUT)
    if text_input is not None and width is not None and text_input.down.shape[1] != width:
        raise SPMModelMismatch(f"{source} reads {text_input.down.shape[1]}-wide text (its txt_in layer) but {label} "
                               f"reads {width}-wide text: it was trained with another text encoder")
    text_width = None if transport is None else transport.text_width
    if text_width is not None and width is not None and text_width != width:
        raise SPMModelMismatch(f"{source}: the text encoder gives {text_width}-wide embeddings but {label} reads "
                               f"{width}-wide text: connect the text encoder of this model")
    if family == UNET and transport is not None and transport.mode is TransportMode.TOKENS:
        raise SPMError(f"{source}: transport {transport.mode.value!r} looks for the concept's token vectors in the prompt's, "
                       f"and {label}'s CLIP is causal: a word's vector depends on the words before it, so the concept "
                       "after other words is missed. Choose another transport (calibrated, latent, paper)")
    if family == FLUX and transport is not None and transport.mode in FLATTENED_PROMPT_MODES:
        raise SPMError(f"{source}: transport {transport.mode.value!r} compares whole flattened prompts, which does not "
                       f"tell {label}'s T5 prompts apart (Flux pads them to 256 tokens: every prompt opens the membrane). "
                       f"Choose {TransportMode.TOKENS.value!r} (or {TransportMode.ALWAYS_OPEN.value!r})")


def content_span(clip, tokens: dict) -> tuple[int, int] | None:
    """(start, stop): where the content tokens of a one-chunk tokenized prompt sit in the text
    encoder output a model reads (None for a prompt without any, the empty prompt). Flux reads T5's
    output (no start token, then an end token and padding to 256); UNets read CLIP's (start token
    first). Textual-inversion embeddings count as content."""
    key = "t5xxl" if "t5xxl" in tokens else ("l" if "l" in tokens else next(iter(tokens)))
    tokenizer = getattr(clip.tokenizer, key if key == "t5xxl" else f"clip_{key}", None)
    special = {getattr(tokenizer, name, None) for name in ("start_token", "end_token", "pad_token")} - {None}
    positions = [i for i, token in enumerate(tokens[key][0]) if not (isinstance(token[0], int) and token[0] in special)]
    return (positions[0], positions[-1] + 1) if positions else None
