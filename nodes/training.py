"""SPM Train Membrane inside ComfyUI (node) and headless (scripts/train_spm.py): the ComfyUI side of
spm_core.training — the model adapter, prompt encoding, progress, cancel and files."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import comfy.ldm.flux.layers
import comfy.ldm.modules.attention
import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import torch
from safetensors.torch import load_file, save_file

from ..spm_core.concepts import Concept, clean_prompt
from ..spm_core.contexts import ContextPrompts, context_texts
from ..spm_core.errors import SPMError, SPMModelMismatch
from ..spm_core.file_format import (
    CONTEXT_DIM_ARCHITECTURE,
    DIFFUSERS_LAYER,
    FLUX_LAYER,
    is_text_token_layer,
    load_membrane,
    save_membrane,
)
from ..spm_core.recompute import recomputed
from ..spm_core.surrogates import Prompt, make_sampler, random_word_prompts
from ..spm_core.training import (
    PAPER_ROLLOUT_CFG,
    AdversarySpace,
    ConceptPrompts,
    StepReport,
    TrainableMembrane,
    Trainer,
    TrainingConfig,
    training_metadata,
)
from .architectures import FLUX, UNET, model_family, model_label, text_stream_blocks, text_width_of
from .encode import tokenize_one_chunk
from .paths import PARTIAL_SUFFIX, refuse_to_replace
from .runtime import membrane_layers_of
from .soft_prompts import ClipSoftPrompts

SURROGATE_POOL = 256
CONTEXT_POOL = 256
ARCHITECTURE_OF = {"SD15": "sd1", "SD20": "sd2", "SD21UnclipL": "sd2", "SDXL": "sdxl"}
# the layer names our files use, one per bound module: the public SPM (diffusers) names on UNets, the
# kohya / BFL names on Flux (ComfyUI's key map also gives UNets their original-module names)
FILE_LAYER = {UNET: DIFFUSERS_LAYER, FLUX: FLUX_LAYER}


class ComfyNoisePredictor:
    """spm_core's NoisePredictor over a ComfyUI model. ComfyUI's apply_model returns the denoised
    latent for every prediction type, and (x - denoised) / sigma is the direction ComfyUI's Euler
    sampler steps along: the noise for eps and v-prediction UNets, the velocity (noise - image) for
    flow models (Flux, Chroma: CONST sampling). Training takes that as "the prediction" throughout:
    the erase target e_neu - g (e_pos - e_neu) is an affine combination of predictions (coefficients
    summing to 1) and the anchor terms are differences, and eps and velocity are each affine in the
    denoised latent at a given (x, sigma), so either gives the same optimum, the loss scaled per
    noise level (velocity differences are eps differences / (1 - sigma))."""

    def __init__(self, patcher) -> None:
        self.base = patcher.model
        self.device = patcher.load_device
        self.latent_channels = self.base.latent_format.latent_channels
        # the sampling a KSampler would use, ModelSamplingFlux / ModelSamplingSD3 patches (shift) included
        self.model_sampling = patcher.get_model_object("model_sampling")

    def sigmas(self, steps: int) -> torch.Tensor:
        """DDIM's uniform steps on UNets (the paper's rollout). Flow models: the 'simple' schedule their
        workflows sample with, which starts at sigma_max = 1 (ddim_uniform on Flux's 10000-entry table
        starts just below it, 0.966 at 10 steps)."""
        flow = isinstance(self.model_sampling, comfy.model_sampling.CONST)
        return comfy.samplers.calculate_sigmas(self.model_sampling, "simple" if flow else "ddim_uniform", steps).cpu()

    def start(self, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """As ComfyUI's samplers start from an empty latent at full denoise (the model's own noise
        scaling, so models that patch it train on the trajectories they sample)."""
        return self.model_sampling.noise_scaling(sigma, noise, torch.zeros_like(noise), max_denoise=True)

    def eps(self, x: torch.Tensor, sigma: torch.Tensor, prompts) -> torch.Tensor:
        shapes = [tuple(p.embedding.shape) for p in prompts]
        if len(set(shapes)) == 1:
            return self._predict(x, sigma, prompts)
        # T5 without padding (Chroma) encodes prompts to different lengths: one call per length, as
        # ComfyUI's samplers batch only conds of one shape (padding would change the prediction)
        groups: dict[tuple, list[int]] = {}
        for row, shape in enumerate(shapes):
            groups.setdefault(shape, []).append(row)
        order = torch.tensor([row for rows in groups.values() for row in rows])
        parts = [self._predict(x[rows], sigma[rows], [prompts[row] for row in rows]) for rows in groups.values()]
        return torch.cat(parts)[torch.argsort(order).to(parts[0].device)]

    def _predict(self, x: torch.Tensor, sigma: torch.Tensor, prompts) -> torch.Tensor:
        x, sigma = x.to(self.device), sigma.to(self.device)
        context = torch.cat([p.embedding[None] for p in prompts]).to(self.device)
        denoised = self.base.apply_model(x, sigma, c_crossattn=context, **self._conditions(x, prompts))
        return (x - denoised) / sigma.reshape(-1, 1, 1, 1)

    def _conditions(self, x: torch.Tensor, prompts) -> dict:
        """The model's inputs beside the text, built by the model itself as ComfyUI's samplers build
        them (BaseModel.extra_conds) for a cond without extra settings: SDXL's pooled vector and size
        embeddings, Flux's pooled CLIP-L vector `y` and its distilled guidance 3.5 (ComfyUI's default,
        and FluxGuidance's), Chroma's guidance 0."""
        pooled = None if prompts[0].pooled is None else torch.cat([p.pooled.reshape(1, -1) for p in prompts])
        conds = self.base.extra_conds(noise=x, device=self.device, width=x.shape[-1] * 8, height=x.shape[-2] * 8,
                                      pooled_output=pooled)
        batched = {key: cond.process_cond(batch_size=x.shape[0], area=None).cond for key, cond in conds.items()}
        return {key: value.to(self.device) if torch.is_tensor(value) else value for key, value in batched.items()}


def trained_layers(model, single_blocks: bool) -> dict[str, torch.nn.Module]:
    """The modules a membrane trained on `model` adapts, by the layer names its file gives them (the
    public SPM names on UNets, kohya / BFL names on Flux; Flux's single blocks too if `single_blocks`).
    Refuses, naming it, a model that takes none."""
    key_map, _ = membrane_layers_of(model)
    names = FILE_LAYER[model_family(model)]
    return {name: model.model.get_submodule(key) for name, key in key_map.items()
            if names.match(name) or (single_blocks and is_text_token_layer(name))}


def architecture_of(model) -> str:
    """The `architecture` a membrane trained on `model` is saved with (flux, sd1, sd2, sdxl): by the
    model's family, then by its config's name or its text width. Refused when none tells: such a
    file could not be loaded."""
    family = model_family(model)
    if family == FLUX:
        return "flux"
    architecture = ARCHITECTURE_OF.get(model_label(model)) or CONTEXT_DIM_ARCHITECTURE.get(text_width_of(model))
    if architecture is None:
        raise SPMModelMismatch(f"{model_label(model)} ({type(model.model).__name__}): cannot tell which Stable "
                               "Diffusion version or Flux model it is, so a membrane trained on it could not be "
                               "loaded; SPM trains on SD1.x, SD2.x, SDXL, Flux.1 and Chroma")
    return architecture


def sampled_without_cfg(model) -> bool:
    """Flux.1 (dev, schnell and their Fill / Kontext variants) is sampled at CFG 1: dev's guidance is a
    model input (FluxGuidance), schnell is distilled to few steps. Chroma is sampled with CFG."""
    return type(model.model) is comfy.model_base.Flux


@contextlib.contextmanager
def frozen_weights(module: torch.nn.Module):
    """While the membrane trains, the model's own parameters are constants to autograd: none asks for a
    gradient, so no layer keeps its input for one (half of what a layer would keep). Parameters loaded
    under ComfyUI's inference mode, which autograd cannot save, are swapped for ordinary tensors on
    the same memory (no copy: a 12B Flux has no room for a second set of weights). Everything is put
    back as it was afterwards, so the model other nodes share is unchanged; nothing writes to it."""
    swapped, frozen = [], []
    for sub in module.modules():
        for name, parameter in list(sub._parameters.items()):
            if parameter is None:
                continue
            if parameter.is_inference():
                alias = torch.empty(0, dtype=parameter.dtype, device=parameter.device)
                alias.set_(parameter.untyped_storage(), parameter.storage_offset(), parameter.size(), parameter.stride())
                sub._parameters[name] = torch.nn.Parameter(alias, requires_grad=False)
                swapped.append((sub, name, parameter))
            elif parameter.requires_grad:
                parameter.requires_grad_(False)
                frozen.append(parameter)
    try:
        yield
    finally:
        for sub, name, parameter in swapped:
            sub._parameters[name] = parameter
        for parameter in frozen:
            parameter.requires_grad_(True)


@contextlib.contextmanager
def copies_of_saved_activations():
    """ComfyUI's Flux and Chroma blocks add their residuals in place (`x += ...`), overwriting the
    residual stream their LayerNorms saved for backward. A copy of each activation autograd saves,
    taken when it is saved, keeps the membrane's gradient exact; weights (leaves) are kept as they are."""
    with torch.autograd.graph.saved_tensors_hooks(lambda saved: saved if saved.is_leaf else saved.clone(),
                                                  lambda saved: saved):
        yield


# the transformer blocks gradient checkpointing runs twice: they hold nearly all of a model's activations
CHECKPOINTED_BLOCKS = (comfy.ldm.modules.attention.BasicTransformerBlock, comfy.ldm.flux.layers.DoubleStreamBlock,
                       comfy.ldm.flux.layers.SingleStreamBlock)


@contextlib.contextmanager
def checkpointed_blocks(diffusion_model: torch.nn.Module, membrane: TrainableMembrane,
                        recompute_context: Callable[[], contextlib.AbstractContextManager]):
    """While inside, every transformer block of the model keeps only its inputs for backward and is
    recomputed there (spm_core.recompute), with the membrane switched as it was in the first run.
    The blocks' own forward methods are put back afterwards."""
    def replay_factory():
        as_then = membrane.as_now()

        @contextlib.contextmanager
        def replay():
            with as_then(), recompute_context():
                yield
        return replay

    parameters = list(membrane.parameters())
    blocks = [module for module in diffusion_model.modules() if isinstance(module, CHECKPOINTED_BLOCKS)]
    previous = [module.__dict__.get("forward") for module in blocks]  # another node's patch, if any
    for block in blocks:
        block.forward = recomputed(block.forward, parameters, replay_factory)
    try:
        yield
    finally:
        for block, forward in zip(blocks, previous):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def encode(clip, text: str, what: str = "prompt") -> Prompt:
    embedding, pooled = clip.encode_from_tokens(tokenize_one_chunk(clip, text, what), return_pooled=True)
    return Prompt(embedding[0].float().cpu().clone(), None if pooled is None else pooled[0].float().cpu().clone())


def vocabulary_words(clip) -> list[str]:
    """Whole words of three letters or more from the text encoder's vocabulary, for anchor and context
    prompts: the CLIP BPE vocabulary's entries ending in </w> (SD, and Flux's CLIP-L, which reads
    the same words as its T5), else T5's sentencepiece pieces that start a word with "▁" (Chroma)."""
    tokenizer = getattr(clip.tokenizer, "clip_l", None) or getattr(clip.tokenizer, "clip_h", None) \
        or getattr(clip.tokenizer, "clip_g", None)
    if tokenizer is not None:
        vocab = tokenizer.tokenizer.get_vocab()
        return sorted(w[:-4] for w in vocab if w.endswith("</w>") and w[:-4].isalpha() and len(w) > 6)
    tokenizer = getattr(clip.tokenizer, "t5xxl", None) or getattr(clip.tokenizer, "clip_t5xxl", None)
    if tokenizer is None:
        raise SPMError(f"the text encoder ({type(clip.tokenizer).__name__}) has neither a CLIP nor a T5 vocabulary to "
                       "draw anchor and context words from: set surrogates to 'gaussian' and contexts to 0")
    vocab = tokenizer.tokenizer.get_vocab()
    return sorted(w[1:] for w in vocab if w.startswith("▁") and w[1:].isascii() and w[1:].isalpha() and len(w) > 3)


@dataclass
class TrainingRequest:
    targets: list[str]
    surrogates: list[str]
    neutral: str
    config: TrainingConfig
    path: str
    resume: bool = False
    overwrite: bool = False


def parse_lines(text: str, what: str) -> list[str]:
    return [clean_prompt(line, what) for line in text.splitlines() if line.strip()]


def partial_path(path: str) -> str:
    return path[: -len(".safetensors")] + PARTIAL_SUFFIX


def state_path(path: str) -> str:
    """Where a cancelled run keeps what resuming needs beside the partial membrane (the optimiser's
    moments, the adversarial bank): a safetensors file whose name no loader lists."""
    return partial_path(path)[: -len(".safetensors")] + ".state"


def train(model, clip, request: TrainingRequest, on_step: Callable[[StepReport], None] | None = None):
    """Train, save `request.path` (or, when cancelled, the partial file) and return
    (membrane, reports, unet rows per iteration)."""
    config = request.config.check()
    if not request.resume:
        unfinished = os.path.exists(partial_path(request.path))
        refuse_to_replace(request.path, request.overwrite, " (or 'resume' to continue its unfinished run)" if unfinished else "")
    if not request.targets:
        raise SPMError("give at least one target concept (one per line)")
    if request.surrogates and len(request.surrogates) not in (1, len(request.targets)):
        raise SPMError(f"{len(request.surrogates)} surrogates for {len(request.targets)} targets: give one, or one per target")
    surrogates = request.surrogates * len(request.targets) if len(request.surrogates) == 1 else request.surrogates
    concepts = tuple(Concept(t, surrogate=(surrogates[i] if surrogates else None), neutral=request.neutral or None)
                     for i, t in enumerate(request.targets))
    modules = trained_layers(model, config.single_blocks)  # refuses a model that takes no membranes, naming it
    architecture = architecture_of(model)
    family = model_family(model)
    token_search = config.adversaries > 0 and config.adversary_space == AdversarySpace.TOKENS.value
    if token_search and family == FLUX:
        raise SPMError(f"adversary space {AdversarySpace.TOKENS.value!r} searches CLIP token embeddings, and "
                       f"{model_label(model)} reads T5 text: set adversary space to "
                       f"{AdversarySpace.CONDITIONING.value!r} (or adversaries to 0)")
    if config.rollout_cfg is None:  # roll out as the model is sampled
        config = dataclasses.replace(config, rollout_cfg=1.0 if sampled_without_cfg(model) else PAPER_ROLLOUT_CFG)

    comfy.model_management.load_models_gpu([model])
    with torch.inference_mode(False), torch.enable_grad():
        empty = encode(clip, "")
        prompts = [ConceptPrompts(c, encode(clip, c.target, "target"), encode(clip, c.target, "target"),
                                  encode(clip, c.surrogate, "surrogate") if c.surrogate
                                  else (encode(clip, c.neutral, "neutral prompt") if c.neutral else empty))
                   for c in concepts]
        avoid = {w for c in concepts for w in re.findall(r"\w+", c.target.lower())}

        def pool_texts() -> list[str]:
            return random_word_prompts(vocabulary_words(clip), avoid, SURROGATE_POOL, config.seed)

        sampler = make_sampler(config.surrogates, prompts[0].target, pool_texts, lambda text: encode(clip, text))
        contexts = None
        if config.contexts:
            words = random_word_prompts(vocabulary_words(clip), avoid, CONTEXT_POOL, config.seed + 1, (1, 3))
            contexts = ContextPrompts([context_texts(c, words) for c in concepts], lambda text: encode(clip, text))
        membrane = TrainableMembrane.for_modules(modules, config.rank, config.alpha, config.seed)
        start = _resume_point(request, membrane) if request.resume else 0
        soft_prompts = ClipSoftPrompts(clip, [c.target for c in concepts]) if token_search else None
        trainer = Trainer(ComfyNoisePredictor(model), membrane, prompts, empty, sampler, config, soft_prompts, contexts)
        if request.resume and os.path.exists(partial_path(request.path)) and os.path.exists(state_path(request.path)):
            trainer.restore(_read_state(state_path(request.path)), os.path.basename(state_path(request.path)))
        name = os.path.basename(request.path)[: -len(".safetensors")]
        completed = start

        def step(report: StepReport) -> None:
            nonlocal completed
            completed = report.iteration + 1
            if on_step is not None:
                on_step(report)

        # the token search differentiates through the text encoder too
        text_encoder = clip.cond_stage_model if token_search else torch.nn.Module()
        # ComfyUI's Flux blocks add their residuals in place: every run of them, recomputed ones too, copies what it saves
        copies = copies_of_saved_activations if family == FLUX else contextlib.nullcontext
        diffusion_model = model.model.diffusion_model
        checkpointing = checkpointed_blocks(diffusion_model, membrane, copies) if config.gradient_checkpointing \
            else contextlib.nullcontext()
        with frozen_weights(diffusion_model), frozen_weights(text_encoder), copies(), checkpointing:
            membrane.attach(modules, text_stream_blocks(model.model))
            try:
                reports = trainer.run(start, step)
            except BaseException as error:  # cancel included: keep what was trained, resumable
                kept = completed > start or request.resume
                if kept:
                    _save(membrane, name, concepts, architecture, config, completed, partial_path(request.path), trainer)
                    _write_state(trainer, state_path(request.path))
                if isinstance(error, torch.OutOfMemoryError):
                    raise SPMError(out_of_memory_advice(config, partial_path(request.path) if kept else None)) from error
                raise
            finally:
                membrane.detach()
    result = _save(membrane, name, concepts, architecture, config, trainer.stopped_at or config.iterations, request.path,
                   trainer)
    for leftover in (partial_path(request.path), state_path(request.path)):
        if os.path.exists(leftover):
            os.remove(leftover)
    rows = trainer.unet_rows / max(1, config.iterations - start)
    return result, reports, rows


def out_of_memory_advice(config: TrainingConfig, kept: str | None) -> str:
    """What to change when training runs out of memory, most effective first (README, Memory)."""
    steps = [] if config.gradient_checkpointing else ["switch on gradient_checkpointing"]
    steps += ["load the model's fp8 version (e.g. Load Diffusion Model with weight_dtype fp8_e4m3fn)",
              "lower latent_size, contexts or anchor_samples (each context and anchor is one more row with gradients)"]
    where = f"; what was trained is kept in {os.path.basename(kept)}, which 'resume' continues" if kept else ""
    return "training ran out of memory: " + "; or ".join(steps) + where


def _resume_point(request: TrainingRequest, membrane: TrainableMembrane) -> int:
    for candidate in (partial_path(request.path), request.path):
        if os.path.exists(candidate):
            saved = load_membrane(candidate)
            membrane.load_weights(saved)
            return int((saved.metadata.get("training") or {}).get("completed_iterations", 0))
    raise SPMError(f"nothing to resume: neither {os.path.basename(partial_path(request.path))} nor "
                   f"{os.path.basename(request.path)} exists in {os.path.dirname(request.path)}")


def _write_state(trainer: Trainer, path: str) -> None:
    temporary = path + ".tmp"
    save_file({key: value.contiguous() for key, value in trainer.state().items()}, temporary)
    os.replace(temporary, path)


def _read_state(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises several kinds for a damaged file
        raise SPMError(f"{os.path.basename(path)}: not a readable training state ({error}); delete it to resume "
                       "with fresh optimiser moments") from None


def _save(membrane: TrainableMembrane, name, concepts, architecture, config, completed, path, trainer):
    result = membrane.as_membrane(name, concepts, architecture)
    levels = [r.erasure for r in trainer.history if r.erasure is not None]
    extra = {"unet_rows_per_iteration": round(trainer.unet_rows / max(1, len(trainer.history)), 2),
             "erasure_level": round(levels[-1], 4) if levels else None,
             "adversary_seconds": round(trainer.adversary_seconds, 1),
             "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    temporary = path + ".tmp"
    save_membrane(temporary, result, training=training_metadata(config, completed, extra))
    os.replace(temporary, path)  # a reader never sees a half-written file
    result.metadata["training"] = training_metadata(config, completed, extra)
    return result

