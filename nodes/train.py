"""SPM Train Membrane: Latent Anchoring training as a node (progress bar with ETA, cancel, resume)."""

from __future__ import annotations

import os
import time

import comfy.model_management
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageDraw

from ..spm_core.surrogates import SAMPLERS
from ..spm_core.training import StepReport, TrainingConfig
from ..spm_core.transport import TransportMode
from . import paths
from .encode import transport_for
from .frontend import send_progress_text
from .gating import MembraneEntry
from .inspect import image_tensor
from .runtime import with_membrane
from .training import TrainingRequest, parse_lines, train

CONTEXTS = TrainingConfig.contexts  # the default, written once on the config


def loss_curve(losses: list[float], erasure: list[tuple[int, float]] = (), stop_at: float = 0.0) -> torch.Tensor:
    """Total loss per iteration (log scale, blue) and the erasure level where it was measured (orange,
    0 at the bottom; the stop level dashed) as a (1, H, W, 3) IMAGE."""
    width, height, margin = 512, 256, 32
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    values = np.log10(np.maximum(np.asarray(losses, dtype=np.float64), 1e-12))
    low, high = float(values.min()), float(values.max())
    span = high - low or 1.0
    inner_w, inner_h = width - 2 * margin, height - 2 * margin

    def x_of(index: float) -> float:
        return margin + inner_w * index / max(1, len(values) - 1)

    points = [(x_of(i), height - margin - inner_h * (v - low) / span) for i, v in enumerate(values)]
    draw.line([(margin, margin), (margin, height - margin), (width - margin, height - margin)], fill="black")
    if len(points) > 1:
        draw.line(points, fill=(30, 90, 200), width=2)
    title = f"loss (log10)  first {losses[0]:.3g}  last {losses[-1]:.3g}"
    if erasure:
        top = max(2.0, stop_at, *(level for _, level in erasure))

        def y_of(level: float) -> float:
            return height - margin - inner_h * max(0.0, level) / top
        if stop_at:
            for x in range(margin, width - margin, 8):
                draw.line([(x, y_of(stop_at)), (x + 4, y_of(stop_at))], fill=(220, 120, 0))
        marks = [(x_of(i), y_of(level)) for i, level in erasure]
        if len(marks) > 1:
            draw.line(marks, fill=(220, 120, 0), width=2)
        for x, y in marks:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(220, 120, 0))
        title += f"   erasure level (orange, 0..{top:.3g}) last {erasure[-1][1]:.2f}"
    draw.text((margin + 4, 4), title, fill="black")
    draw.text((width - margin - 90, height - margin + 8), f"{len(losses)} iterations", fill="black")
    return image_tensor(image)


class TrainSPM(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SPMTrain",
            display_name="SPM Train Membrane (Concept Eraser)",
            category="training",
            description="Trains a membrane that erases the target concept(s) from this model (Latent Anchoring), "
                        "saves it in models/spm under the given name and returns the model with it applied.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The model to erase the concept from (it is not changed)."),
                io.Clip.Input("clip", tooltip="Its text encoder (with the CLIP skip you use for prompts)."),
                io.String.Input("target", multiline=True, default="snoopy",
                                tooltip="Concept(s) to erase, one per line. Several lines train one membrane for all."),
                io.String.Input("surrogate", multiline=True, default="",
                                tooltip="Optional: what the target should become instead (an edit, e.g. 'a dog'). One line for "
                                        "all targets or one per target. Empty: erase toward the neutral prompt."),
                io.String.Input("neutral", default="", tooltip="The neutral prompt the erase target is built from. "
                                                               "Empty is the paper's default."),
                io.Int.Input("iterations", default=500, min=1, max=100000,
                             tooltip=TrainingConfig.help("iterations")),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=0.1, step=1e-5,
                               tooltip=TrainingConfig.help("learning_rate")),
                io.Int.Input("rank", default=1, min=1, max=64, tooltip=TrainingConfig.help("rank")),
                io.Float.Input("alpha", default=1.0, min=0.01, max=64.0, step=0.01,
                               tooltip=TrainingConfig.help("alpha")),
                io.Float.Input("anchor_strength", default=1000.0, min=0.0, max=1e6, step=10.0,
                               tooltip=TrainingConfig.help("anchor_strength")),
                io.Int.Input("anchor_samples", default=2, min=0, max=64,
                             tooltip=TrainingConfig.help("anchor_samples")),
                io.Combo.Input("surrogate_sampler", options=list(SAMPLERS), default="prompts",
                               tooltip=TrainingConfig.help("surrogates")),
                io.Float.Input("erase_guidance", default=1.0, min=0.0, max=10.0, step=0.1,
                               tooltip=TrainingConfig.help("erase_guidance")),
                io.Int.Input("rollout_steps", default=30, min=2, max=200,
                             tooltip=TrainingConfig.help("rollout_steps")),
                io.Int.Input("latent_size", default=64, min=8, max=256, step=8,
                             tooltip=TrainingConfig.help("latent_sizes")),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip=TrainingConfig.help("seed")),
                io.String.Input("name", default="my_membrane", tooltip="File name in models/spm (without extension)."),
                io.Boolean.Input("resume", default=False, tooltip="Continue a cancelled run of the same name "
                                                                  "(the .partial.safetensors file of that name) instead of starting over."),
                # added later: optional, so workflows saved before them keep running as they did then (never
                # replacing a file, though, which the first versions did silently; contexts: the paper's loop)
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip="Replace the membrane of that name in models/spm if it exists. Off: an existing membrane is "
                                         "never replaced (training stops with a message before it starts)."),
                io.Float.Input("stop_at_erasure", default=0.0, min=0.0, max=10.0, step=0.05, optional=True,
                               tooltip=TrainingConfig.help("stop_at_erasure")),
                io.Int.Input("adversaries", default=0, min=0, max=64, optional=True,
                             tooltip=TrainingConfig.help("adversaries")),
                io.Int.Input("adversary_tokens", default=3, min=1, max=16, optional=True,
                             tooltip=TrainingConfig.help("adversary_tokens")),
                io.Int.Input("adversary_every", default=20, min=1, max=10000, optional=True,
                             tooltip=TrainingConfig.help("adversary_every")),
                io.Int.Input("adversary_steps", default=20, min=1, max=1000, optional=True,
                             tooltip=TrainingConfig.help("adversary_steps")),
                io.Int.Input("contexts", default=CONTEXTS, min=0, max=16, optional=True,
                             tooltip=TrainingConfig.help("contexts")),
                io.Float.Input("rollout_cfg", default=0.0, min=0.0, max=30.0, step=0.5, optional=True,
                               tooltip=TrainingConfig.help("rollout_cfg")),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                 tooltip=TrainingConfig.help("gradient_checkpointing")),
                io.Boolean.Input("single_blocks", default=False, optional=True, tooltip=TrainingConfig.help("single_blocks")),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the new membrane applied (paper transport; "
                                                              "tokens on Flux and Chroma)."),
                io.Image.Output(display_name="loss", tooltip="Loss curve."),
                io.String.Output(display_name="path", tooltip="Where the membrane was saved."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, target, surrogate, neutral, iterations, learning_rate, rank, alpha, anchor_strength,
                anchor_samples, surrogate_sampler, erase_guidance, rollout_steps, latent_size, seed, name, resume,
                overwrite=False, stop_at_erasure=0.0, adversaries=0, adversary_tokens=3, adversary_every=20,
                adversary_steps=20, contexts=0, rollout_cfg=0.0, gradient_checkpointing=False,
                single_blocks=False) -> io.NodeOutput:
        name = paths.safe_stem(name)
        folder = folder_paths.get_folder_paths(paths.FOLDER)[0]
        os.makedirs(folder, exist_ok=True)
        config = TrainingConfig(iterations=iterations, learning_rate=learning_rate, rank=rank, alpha=alpha,
                                erase_guidance=erase_guidance, anchor_strength=anchor_strength, anchor_samples=anchor_samples,
                                rollout_steps=rollout_steps, latent_sizes=[latent_size], seed=seed,
                                surrogates=surrogate_sampler, stop_at_erasure=stop_at_erasure, adversaries=adversaries,
                                adversary_tokens=adversary_tokens, adversary_every=adversary_every,
                                adversary_steps=adversary_steps, contexts=contexts, rollout_cfg=rollout_cfg or None,
                                gradient_checkpointing=gradient_checkpointing, single_blocks=single_blocks)
        request = TrainingRequest(targets=parse_lines(target, "target"), surrogates=parse_lines(surrogate, "surrogate"),
                                  neutral=neutral.strip(), config=config,
                                  path=os.path.join(folder, name + ".safetensors"), resume=resume, overwrite=overwrite)
        progress = comfy.utils.ProgressBar(iterations)
        started = time.monotonic()

        last_level: list[float] = []

        def on_step(report: StepReport) -> None:
            done = report.iteration + 1
            if report.erasure is not None:
                last_level[:] = [report.erasure]
            progress.update_absolute(done, iterations)
            _show_eta(cls.hidden.unique_id, done, iterations, started, report.loss, last_level[0] if last_level else None)
            comfy.model_management.throw_exception_if_processing_interrupted()

        membrane, reports, _ = train(model, clip, request, on_step)
        erasure = [(index, r.erasure) for index, r in enumerate(reports) if r.erasure is not None]
        # the paper's gate, or on Flux (T5 text, where whole-prompt cosines say nothing) the token gate
        mode = TransportMode.TOKENS if membrane.architecture == "flux" else TransportMode.PAPER
        entry = MembraneEntry(membrane=membrane, strength=1.0, transport=transport_for(clip, membrane, mode),
                              node_id=cls.hidden.unique_id)
        losses = [r.loss for r in reports] or [0.0]
        return io.NodeOutput(with_membrane(model, entry), loss_curve(losses, erasure, stop_at_erasure), request.path,
                             ui={"text": [summary(request.path, membrane.metadata["training"], losses[-1], config)]})


def summary(path: str, training: dict, last_loss: float, config: TrainingConfig) -> str:
    """What the node says when training ends: where the file went, how far it got and what robustness cost."""
    done = training["completed_iterations"]
    text = f"saved {path} after {done} iterations, final loss {last_loss:.4g}"
    level = training.get("erasure_level")
    if level is not None:
        text += f", erasure level {level:.2f}"
        if config.stop_at_erasure:
            reached = level >= config.stop_at_erasure
            text += f" ({'reached' if reached else 'not reached'}: stop at {config.stop_at_erasure:g})"
    if config.adversaries:
        text += f"; adversarial prompt search {training['adversary_seconds']:.0f} s"
    return text


def _show_eta(node_id, done: int, total: int, started: float, loss: float, erasure: float | None) -> None:
    if node_id is None or (done % max(1, total // 100) and done != total):
        return
    elapsed = time.monotonic() - started
    remaining = elapsed / done * (total - done)
    level = "" if erasure is None else f"  erasure {erasure:.2f}"
    send_progress_text(f"{done}/{total}  loss {loss:.4g}{level}  ETA {remaining:.0f}s", node_id)
