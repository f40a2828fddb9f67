"""The SPM file format: read the public SPM files and kohya/LECO-style LoRAs unchanged, write
ours with the same tensor keys (so stock LoRA loaders still read them) plus richer metadata.

Tensor keys: `lora_unet_<diffusers module path, . -> _>.{lora_down.weight, lora_up.weight, alpha}`;
Flux membranes name their layers after the original (BFL) Flux modules, as kohya's Flux LoRAs do:
`lora_unet_double_blocks_<i>_txt_attn_qkv`, `lora_unet_txt_in`, ...
Public metadata: `prompts` (targets joined by ","), `rank`, `alpha`.
Ours adds: `spm_format`, `concepts` (JSON list), `architecture`, `base_model`, `training`, and on
Flux membranes that adapt single blocks `single_blocks: text_tokens` (FLUX_TEXT_TOKEN_LAYER).
Only `.safetensors` is read: pickled formats can run code when loaded and are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .concepts import Concept, check_concept_count, concept_from_json, parse_concept_list
from .errors import SPMError, SPMFileError
from .membrane import LayerWeights, Membrane

FORMAT_VERSION = "1"
PREFIX = "lora_unet_"
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
PICKLED_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
ARCHITECTURES = ("sd1", "sd2", "sdxl", "flux")
UNET_ARCHITECTURES = ("sd1", "sd2", "sdxl")
CONTEXT_DIM_ARCHITECTURE = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
MAX_FILE_BYTES = 2 * 1024**3

# The layers SPM adapts inside each transformer block (docs/architecture.md, the method). Files name them after the
# diffusers UNet (the official trainer) or after the original UNet (kohya's SDXL LoRAs).
_LAYER_IN_BLOCK = r"_(?:proj_in|proj_out|transformer_blocks_\d+_(?:attn[12]_to_(?:q|k|v|out_0)|ff_net_0_proj|ff_net_2))$"
DIFFUSERS_LAYER = re.compile(r"^lora_unet_(?:(?:down|up)_blocks_\d+_attentions_\d+|mid_block_attentions_0)" + _LAYER_IN_BLOCK)
ORIGINAL_UNET_LAYER = re.compile(r"^lora_unet_(?:input_blocks_\d+_1|middle_block_1|output_blocks_\d+_1)" + _LAYER_IN_BLOCK)
# Flux (issue 17): where the text enters. The text-input projection and the text
# stream of every double block (its attention's qkv and proj, its MLP) read text tokens only, so a
# per-row update there touches no image token directly. The image stream (and single blocks adapted
# on every token, below) are not membrane layers: FLUX_OTHER_LAYER names them so that a file adapting
# them is refused with the reason.
FLUX_LAYER = re.compile(r"^lora_unet_(?:txt_in|double_blocks_\d+_txt_(?:attn_qkv|attn_proj|mlp_0|mlp_2))$")
# Single blocks run one Linear over the text and image tokens together. A membrane adapts their
# linear1 (qkv and MLP in) and linear2 (attention and MLP out) on the text tokens only (the update is
# masked to them, so no image token passes through a membrane there either). A stock loader cannot mask:
# files that adapt these layers say so in their metadata (TEXT_TOKENS_KEY), and other files that adapt
# single blocks are refused.
FLUX_TEXT_TOKEN_LAYER = re.compile(r"^lora_unet_single_blocks_\d+_linear[12]$")
TEXT_TOKENS_KEY, TEXT_TOKENS_VALUE = "single_blocks", "text_tokens"
FLUX_OTHER_LAYER = re.compile(r"^lora_unet_(?:single_blocks_\d+_\w+|double_blocks_\d+_(?:img_\w+|txt_mod_lin))$")
# Public layouts of the same Flux layers, read into the names above: the original (BFL) module paths
# with dots (`diffusion_model.double_blocks.0.txt_attn.qkv`) and diffusers / PEFT paths
# (`transformer.transformer_blocks.0.attn.add_q_proj`; OneTrainer writes `lora_transformer_<path, _>`),
# with lora_down/lora_up or PEFT's lora_A/lora_B tensors. Diffusers splits the text stream's qkv into
# add_q/k/v_proj: those are joined into one qkv layer (ranks concatenated, each part's alpha / rank
# folded into its rows of up), which is exactly their sum. The correspondences are ComfyUI's
# (comfy.utils.flux_to_diffusers); tests/test_flux.py checks them against ComfyUI's LoRA loading.
PAIRS = ((DOWN, UP), (".lora_A.weight", ".lora_B.weight"))
SUFFIXES = (*(suffix for pair in PAIRS for suffix in pair), ALPHA)
_LAYOUT_PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.", "lora_transformer_")
_DIFFUSERS_FLUX_LAYER = (
    (re.compile(r"^context_embedder$"), "txt_in"),
    (re.compile(r"^transformer_blocks_(\d+)_attn_add_([qkv])_proj$"), "double_blocks_{}_txt_attn_qkv"),
    (re.compile(r"^transformer_blocks_(\d+)_attn_to_add_out$"), "double_blocks_{}_txt_attn_proj"),
    (re.compile(r"^transformer_blocks_(\d+)_ff_context_net_0_proj$"), "double_blocks_{}_txt_mlp_0"),
    (re.compile(r"^transformer_blocks_(\d+)_ff_context_net_2$"), "double_blocks_{}_txt_mlp_2"),
)


MAX_WEIGHT_SCALE = 1e4  # bound on |up| x |down| x alpha / rank: real adapters stay below ~10


def is_membrane_layer(name: str) -> bool:
    """A layer every membrane file may adapt (the text-token layers need the file's word: is_text_token_layer)."""
    return bool(DIFFUSERS_LAYER.match(name) or ORIGINAL_UNET_LAYER.match(name) or FLUX_LAYER.match(name))


def is_text_token_layer(name: str) -> bool:
    """A Flux single-block layer, which a membrane adapts on the text tokens only."""
    return bool(FLUX_TEXT_TOKEN_LAYER.match(name))


def layer_name(stem: str, text_tokens: bool = False) -> tuple[str, int | None] | None:
    """The membrane layer a file's layer name (its keys without the tensor suffix) adapts, in the
    names above, and for a diffusers split of Flux's qkv which third it is (0 q, 1 k, 2 v); None
    when it names no membrane layer. Single-block layers count only in a file that adapts them on
    the text tokens (`text_tokens`)."""
    if is_membrane_layer(stem) or (text_tokens and is_text_token_layer(stem)):
        return stem, None
    flat = _flat_path(stem)
    if FLUX_LAYER.match(PREFIX + flat) or (text_tokens and is_text_token_layer(PREFIX + flat)):
        return PREFIX + flat, None
    for pattern, template in _DIFFUSERS_FLUX_LAYER:
        match = pattern.match(flat)
        if match:
            part = match.group(2) if pattern.groups > 1 else None
            return PREFIX + template.format(match.group(1) if pattern.groups else ""), None if part is None else "qkv".index(part)
    return None


def _flat_path(stem: str) -> str:
    """A layer path without its layout's prefix, `.` -> `_`."""
    prefix = next((p for p in _LAYOUT_PREFIXES if stem.startswith(p)), "")
    return stem[len(prefix):].replace(".", "_")


def module_key_map(module_names: Iterable[str]) -> dict[str, str]:
    """File layer name -> module name for a UNet whose modules are named like diffusers'
    (`down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`): the key map that binds
    membrane files to it without ComfyUI."""
    names = {PREFIX + name.replace(".", "_"): name for name in module_names}
    return {layer: name for layer, name in names.items() if is_membrane_layer(layer)}


def load_membrane(path: str) -> Membrane:
    """Read and validate a membrane file. Raises SPMFileError naming the file and the problem."""
    path = os.fspath(path)
    _check_path(path)
    tensors, metadata = _read_safetensors(path)
    file_layers = _layers_from_tensors(path, tensors, metadata.get(TEXT_TOKENS_KEY) == TEXT_TOKENS_VALUE)
    concepts = _concepts_from_metadata(path, metadata)
    _check_metadata_agrees(path, metadata, {stem: layer for stem, (_, _, layer) in file_layers.items()})
    layers = _joined_layers(path, file_layers)
    architecture = _architecture(path, metadata, layers)
    extra = {"source": os.path.basename(path), "spm_format": metadata.get("spm_format")}
    for key in ("base_model", "training"):
        if key in metadata:
            extra[key] = _json_field(path, metadata, key)
    name = os.path.splitext(os.path.basename(path))[0]
    return Membrane(name=name, concepts=concepts, layers=layers, architecture=architecture, metadata=extra)


def save_membrane(path: str, membrane: Membrane, *, base_model: Mapping | None = None,
                  training: Mapping | None = None) -> None:
    """Write `membrane` in our format (public key scheme + our metadata)."""
    tensors = lora_tensors(membrane)
    alphas = {layer.alpha for layer in membrane.layers.values()}
    ranks = {layer.rank for layer in membrane.layers.values()}
    metadata = {
        "spm_format": FORMAT_VERSION,
        "concepts": json.dumps([c.to_json() for c in membrane.concepts], ensure_ascii=False),
        "prompts": ",".join(c.target for c in membrane.concepts),
        "rank": str(ranks.pop()) if len(ranks) == 1 else "per-layer",
        "alpha": str(alphas.pop()) if len(alphas) == 1 else "per-layer",
        "architecture": membrane.architecture,
    }
    if any(is_text_token_layer(name) for name in membrane.layers):
        metadata[TEXT_TOKENS_KEY] = TEXT_TOKENS_VALUE
    for key, value in (("base_model", base_model or membrane.metadata.get("base_model")),
                       ("training", training or membrane.metadata.get("training"))):
        if value:
            metadata[key] = json.dumps(value, ensure_ascii=False, sort_keys=True)
    save_file(tensors, os.fspath(path), metadata=metadata)


def lora_tensors(membrane: Membrane) -> dict[str, torch.Tensor]:
    """The membrane as kohya-style LoRA tensors; 1x1-conv layers as 4-D kernels, as stock loaders expect."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in membrane.layers.items():
        down, up = layer.down.detach().float(), layer.up.detach().float()
        if layer.conv:
            down, up = down[:, :, None, None], up[:, :, None, None]
        tensors[name + DOWN] = down.contiguous()
        tensors[name + UP] = up.contiguous()
        tensors[name + ALPHA] = torch.tensor(float(layer.alpha))
    return tensors


def _check_path(path: str) -> None:
    lower = path.lower()
    if lower.endswith(PICKLED_SUFFIXES):
        raise SPMFileError(
            path, "pickled checkpoints are not loaded because unpickling can run arbitrary code. Convert it once, "
            "in a Python you trust, with: `from safetensors.torch import save_file; import torch; "
            "save_file(torch.load(SRC, weights_only=True), DST + '.safetensors')`")
    if not lower.endswith(".safetensors"):
        raise SPMFileError(path, "not a .safetensors file; SPM membranes are read from .safetensors only")
    if not os.path.isfile(path):
        raise SPMFileError(path, "file not found")
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise SPMFileError(path, f"file is {size / 2**30:.1f} GiB; a membrane is a few MB. Is this a full model checkpoint?")


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types, and OSError on short files
        raise SPMFileError(path, f"not a readable safetensors file (truncated or corrupt?): {error}") from None
    if not tensors:
        raise SPMFileError(path, "the file holds no tensors")
    return tensors, metadata


def _layers_from_tensors(path: str, tensors: dict[str, torch.Tensor],
                         text_tokens: bool) -> dict[str, tuple[str, int | None, LayerWeights]]:
    """file layer name -> (membrane layer name, qkv part or None, its weights); single-block layers
    only where the file adapts them on the text tokens (`text_tokens`)."""
    names: dict[str, tuple[str, int | None]] = {}
    foreign: list[str] = []
    for key in tensors:
        for suffix in SUFFIXES:
            layer = layer_name(key[: -len(suffix)], text_tokens) if key.endswith(suffix) else None
            if layer is not None:
                names[key[: -len(suffix)]] = layer
                break
        else:
            foreign.append(key)
    if foreign:
        flux_layers = any(_other_flux_layer(k) for k in foreign)
        if any(k.startswith("lora_te") for k in foreign):
            hint = "it also adapts the text encoder"
        elif flux_layers:
            hint = ("it adapts Flux layers that membranes do not use as it does: the image stream, or single blocks "
                    "(one layer over text and image tokens together) on every token, where a membrane adapts them on "
                    "the text tokens only (files made so say it in their metadata, "
                    f"{TEXT_TOKENS_KEY}={TEXT_TOKENS_VALUE}); a Flux membrane adapts txt_in, the text stream of the "
                    "double blocks and the single blocks' text tokens")
        else:
            hint = "it adapts layers outside the transformer blocks or uses another adapter type"
        if not names and not flux_layers:
            raise SPMFileError(path, f"not an SPM membrane or LoRA in the SPM key scheme (e.g. key {foreign[0]!r}); "
                                     "expected lora_unet_<transformer layer>.lora_down.weight / .lora_up.weight / .alpha")
        raise SPMFileError(path, f"not an SPM membrane: {hint} ({len(foreign)} keys such as {foreign[0]!r}). "
                                 "Load it with ComfyUI's LoraLoader instead.")
    if not names:
        raise SPMFileError(path, "no membrane layers found")
    return {stem: (*names[stem], _layer(path, stem, tensors)) for stem in sorted(names)}


def _other_flux_layer(key: str) -> bool:
    """Whether a tensor key belongs to a Flux layer membranes do not use (single blocks, image stream)."""
    flat = _flat_path(next((key[: -len(s)] for s in SUFFIXES if key.endswith(s)), key))
    return bool(FLUX_OTHER_LAYER.match(flat if flat.startswith(PREFIX) else PREFIX + flat)
                or re.match(r"^single_transformer_blocks_\d+_", flat))


def _joined_layers(path: str, file_layers: dict[str, tuple[str, int | None, LayerWeights]]) -> dict[str, LayerWeights]:
    """Membrane layers by name: each file layer as it is, diffusers' q/k/v parts of Flux's qkv joined."""
    grouped: dict[str, list[tuple[str, int | None, LayerWeights]]] = {}
    for stem, (name, part, layer) in file_layers.items():
        grouped.setdefault(name, []).append((stem, part, layer))
    layers = {}
    for name, parts in sorted(grouped.items()):
        split = [part for _, part, _ in parts]
        if None in split or len(set(split)) != len(split):
            if len(parts) > 1:
                raise SPMFileError(path, f"layers {' and '.join(stem for stem, _, _ in parts)} adapt the same layer {name}")
            layers[name] = parts[0][2]
            continue
        width = {layer.up.shape[0] for _, _, layer in parts}
        if len(width) > 1:
            raise SPMFileError(path, f"the q, k and v parts of {name} are of different widths {sorted(width)}")
        rows = width.pop()
        ups = [torch.zeros(3 * rows, layer.rank).index_copy_(0, torch.arange(part * rows, (part + 1) * rows),
                                                             layer.up * layer.scale) for _, part, layer in parts]
        down = torch.cat([layer.down for _, _, layer in parts])
        layers[name] = LayerWeights(down=down, up=torch.cat(ups, dim=1), alpha=float(down.shape[0]))
    return layers


def _layer(path: str, name: str, tensors: dict[str, torch.Tensor]) -> LayerWeights:
    down_suffix, up_suffix = next((pair for pair in PAIRS if name + pair[0] in tensors or name + pair[1] in tensors), PAIRS[0])
    down, up = tensors.get(name + down_suffix), tensors.get(name + up_suffix)
    if down is None or up is None:
        missing = down_suffix if down is None else up_suffix
        raise SPMFileError(path, f"layer {name} has no {missing.lstrip('.')} tensor")
    conv = down.ndim == 4
    if conv != (up.ndim == 4) or down.ndim not in (2, 4):
        raise SPMFileError(path, f"layer {name}: down {tuple(down.shape)} and up {tuple(up.shape)} "
                                 "are not a matching pair of matrices or 1x1 kernels")
    if conv and (tuple(down.shape[2:]) != (1, 1) or tuple(up.shape[2:]) != (1, 1)):
        raise SPMFileError(path, f"layer {name}: only 1x1 convolution kernels are supported, got {tuple(down.shape)}")
    down, up = down.reshape(down.shape[0], down.shape[1]).float(), up.reshape(up.shape[0], up.shape[1]).float()
    if up.shape[1] != down.shape[0]:
        raise SPMFileError(path, f"layer {name}: rank mismatch, down has {down.shape[0]} rows but up has {up.shape[1]} columns")
    if down.shape[0] == 0:
        raise SPMFileError(path, f"layer {name} has rank 0")
    for what, tensor in (("down", down), ("up", up)):
        if not torch.isfinite(tensor).all():
            raise SPMFileError(path, f"layer {name}: {what} weights contain NaN or inf; the file is damaged")
    alpha_tensor = tensors.get(name + ALPHA)
    if alpha_tensor is None:
        alpha = float(down.shape[0])  # kohya convention: no alpha means alpha = rank (scale 1)
    else:
        if alpha_tensor.numel() != 1:
            raise SPMFileError(path, f"layer {name}: alpha must be a single number, got shape {tuple(alpha_tensor.shape)}")
        alpha = float(alpha_tensor.float().item())
        if not math.isfinite(alpha):
            raise SPMFileError(path, f"layer {name}: alpha is {alpha}")
    largest = float((up.abs().amax(dim=0) * down.abs().amax(dim=1)).max()) * abs(alpha) / down.shape[0]
    if largest > MAX_WEIGHT_SCALE:
        raise SPMFileError(path, f"layer {name}: weights reach {largest:.3g} (up x down x alpha / rank); a trained "
                                 f"membrane or LoRA stays far below {MAX_WEIGHT_SCALE:g}, so the file is damaged or "
                                 "was scaled by mistake")
    return LayerWeights(down=down, up=up, alpha=alpha, conv=conv)


def _json_field(path: str, metadata: dict[str, str], key: str):
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as error:
        raise SPMFileError(path, f"metadata '{key}' is not valid JSON: {error}") from None


def _concepts_from_metadata(path: str, metadata: dict[str, str]) -> tuple[Concept, ...]:
    try:
        if "concepts" in metadata:
            entries = _json_field(path, metadata, "concepts")
            if not isinstance(entries, list):
                raise SPMError("metadata 'concepts' must be a JSON list")
            concepts = check_concept_count(tuple(concept_from_json(e) for e in entries))
            if "prompts" in metadata:
                listed = [unicodedata.normalize("NFC", p).strip() for p in metadata["prompts"].split(",") if p.strip()]
                if any(c.target not in listed for c in concepts if "," not in c.target) or (listed and not concepts):
                    raise SPMError(f"metadata 'prompts' ({metadata['prompts']!r}) contradicts 'concepts'")
            return concepts
        return parse_concept_list(metadata.get("prompts", ""))
    except SPMFileError:
        raise  # already names the file
    except SPMError as error:
        raise SPMFileError(path, str(error)) from None


def _check_metadata_agrees(path: str, metadata: dict[str, str], layers: dict[str, LayerWeights]) -> None:
    ranks = {layer.rank for layer in layers.values()}
    if metadata.get("rank", "per-layer") != "per-layer":
        try:
            rank = int(float(metadata["rank"]))  # the official reader accepts "1.0" too
        except ValueError:
            raise SPMFileError(path, f"metadata 'rank' is {metadata['rank']!r}, not a whole number") from None
        if ranks != {rank}:
            raise SPMFileError(path, f"metadata says rank {rank} but the tensors have rank {sorted(ranks)}")
    if metadata.get("alpha", "per-layer") != "per-layer":
        try:
            alpha = float(metadata["alpha"])
        except ValueError:
            raise SPMFileError(path, f"metadata 'alpha' is {metadata['alpha']!r}, not a number") from None
        # the official trainer stores alpha tensors in the save precision (bf16 rounds by up to 0.4%)
        if any(not math.isclose(layer.alpha, alpha, rel_tol=1e-2) for layer in layers.values()):
            raise SPMFileError(path, f"metadata says alpha {alpha} but the layers' alpha tensors differ from it")


def infer_architecture(layers: Mapping[str, LayerWeights]) -> str | None:
    """flux from Flux layer names; sd1 / sd2 / sdxl from the cross-attention context width; None
    if no layer tells."""
    if any(FLUX_LAYER.match(name) or is_text_token_layer(name) for name in layers):
        return "flux"
    for name, layer in layers.items():
        if name.endswith(("attn2_to_k", "attn2_to_v")):
            return CONTEXT_DIM_ARCHITECTURE.get(layer.down.shape[1])
    return None


def _architecture(path: str, metadata: dict[str, str], layers: dict[str, LayerWeights]) -> str:
    inferred = infer_architecture(layers)
    declared = metadata.get("architecture")
    if declared is not None and declared not in ARCHITECTURES:
        raise SPMFileError(path, f"metadata 'architecture' is {declared!r}; expected one of {', '.join(ARCHITECTURES)}")
    if declared and inferred and declared != inferred:
        raise SPMFileError(path, f"metadata says architecture {declared} but the layer shapes are those of {inferred}")
    return declared or inferred or "unknown"
