"""SPM Train Membrane inside ComfyUI (node) and headless (scripts/train_spm.py): the ComfyUI side of
spm_core.training — the model adapter, prompt encoding, progress, cancel and files."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_management
import comfy.samplers
import torch
from safetensors.torch import load_file, save_file

from ..spm_core.concepts import Concept, clean_prompt
from ..spm_core.contexts import ContextPrompts, context_texts
from ..spm_core.errors import SPMError
from ..spm_core.file_format import DIFFUSERS_LAYER, load_membrane, save_membrane
from ..spm_core.surrogates import Prompt, make_sampler, random_word_prompts
from ..spm_core.training import AdversarySpace, ConceptPrompts, StepReport, TrainableMembrane, Trainer, TrainingConfig, training_metadata
from .encode import tokenize_one_chunk
from .paths import PARTIAL_SUFFIX, refuse_to_replace
from .runtime import membrane_layers_of
from .soft_prompts import ClipSoftPrompts

SURROGATE_POOL = 256
CONTEXT_POOL = 256
ARCHITECTURE_OF = {"SD15": "sd1", "SD20": "sd2", "SD21UnclipL": "sd2", "SDXL": "sdxl"}


class ComfyNoisePredictor:
    """spm_core's NoisePredictor over a ComfyUI model. ComfyUI's apply_model returns the denoised
    latent for every prediction type, so eps = (x - denoised) / sigma holds for v-prediction too."""

    def __init__(self, patcher) -> None:
        self.base = patcher.model
        self.device = patcher.load_device
        self.latent_channels = self.base.latent_format.latent_channels

    def sigmas(self, steps: int) -> torch.Tensor:
        return comfy.samplers.calculate_sigmas(self.base.model_sampling, "ddim_uniform", steps).cpu()

    def start(self, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """As ComfyUI's samplers start from an empty latent at full denoise (the model's own noise
        scaling, so models that patch it train on the trajectories they sample)."""
        return self.base.model_sampling.noise_scaling(sigma, noise, torch.zeros_like(noise), max_denoise=True)

    def eps(self, x: torch.Tensor, sigma: torch.Tensor, prompts) -> torch.Tensor:
        x, sigma = x.to(self.device), sigma.to(self.device)
        context = torch.cat([p.embedding[None] for p in prompts]).to(self.device)
        extra = {}
        if prompts[0].pooled is not None:
            pooled = torch.cat([p.pooled.reshape(1, -1) for p in prompts])
            y = self.base.encode_adm(pooled_output=pooled, width=x.shape[-1] * 8, height=x.shape[-2] * 8)
            if y is not None:
                extra["y"] = y.to(self.device)
        denoised = self.base.apply_model(x, sigma, c_crossattn=context, **extra)
        return (x - denoised) / sigma.reshape(-1, 1, 1, 1)


@contextlib.contextmanager
def trainable_copies(module: torch.nn.Module):
    """Parameters loaded under ComfyUI's inference mode cannot be saved for backward, and the
    membrane's gradient flows back through every UNet layer. Swap such parameters for plain
    copies while training (this costs one more copy of the UNet weights) and put the originals
    back afterwards, so the model other nodes share is as it was."""
    swapped = []
    for sub in module.modules():
        for name, parameter in list(sub._parameters.items()):
            if parameter is not None and parameter.is_inference():
                sub._parameters[name] = torch.nn.Parameter(parameter.clone(), requires_grad=False)
                swapped.append((sub, name, parameter))
    try:
        yield
    finally:
        for sub, name, parameter in swapped:
            sub._parameters[name] = parameter


def encode(clip, text: str, what: str = "prompt") -> Prompt:
    embedding, pooled = clip.encode_from_tokens(tokenize_one_chunk(clip, text, what), return_pooled=True)
    return Prompt(embedding[0].float().cpu().clone(), None if pooled is None else pooled[0].float().cpu().clone())


def vocabulary_words(clip) -> list[str]:
    """Whole words from the CLIP BPE vocabulary (entries ending in </w>, letters only)."""
    tokenizer = getattr(clip.tokenizer, "clip_l", None) or getattr(clip.tokenizer, "clip_h", None) \
        or getattr(clip.tokenizer, "clip_g", None)
    vocab = tokenizer.tokenizer.get_vocab()
    return sorted(w[:-4] for w in vocab if w.endswith("</w>") and w[:-4].isalpha() and len(w) > 6)


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
        refuse_to_replace(request.path, request.overwrite, " (or 'resume' to continue training it)")
    if not request.targets:
        raise SPMError("give at least one target concept (one per line)")
    if request.surrogates and len(request.surrogates) not in (1, len(request.targets)):
        raise SPMError(f"{len(request.surrogates)} surrogates for {len(request.targets)} targets: give one, or one per target")
    surrogates = request.surrogates * len(request.targets) if len(request.surrogates) == 1 else request.surrogates
    concepts = tuple(Concept(t, surrogate=(surrogates[i] if surrogates else None), neutral=request.neutral or None)
                     for i, t in enumerate(request.targets))
    architecture = ARCHITECTURE_OF.get(type(model.model.model_config).__name__, "unknown")

    comfy.model_management.load_models_gpu([model])
    key_map, shapes = membrane_layers_of(model)
    names = {name: key for name, key in key_map.items() if DIFFUSERS_LAYER.match(name)}
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
        membrane = TrainableMembrane({n: shapes[k] for n, k in names.items()}, config.rank, config.alpha, config.seed)
        start = _resume_point(request, membrane) if request.resume else 0
        modules = {n: model.model.get_submodule(k) for n, k in names.items()}
        token_search = config.adversaries > 0 and config.adversary_space == AdversarySpace.TOKENS.value
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
        with trainable_copies(model.model.diffusion_model), trainable_copies(text_encoder):
            membrane.attach(modules)
            try:
                reports = trainer.run(start, step)
            except BaseException:  # cancel included: keep what was trained, resumable
                if completed > start or request.resume:
                    _save(membrane, name, concepts, architecture, config, completed, partial_path(request.path), trainer)
                    _write_state(trainer, state_path(request.path))
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

