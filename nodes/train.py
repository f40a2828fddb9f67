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
from ..spm_core.transport import Transport, TransportMode
from . import paths
from .encode import encode_concept
from .inspect import image_tensor
from .runtime import MembraneEntry, with_membrane
from .training import TrainingRequest, parse_lines, train


def loss_curve(losses: list[float]) -> torch.Tensor:
    """Total loss per iteration (log scale) as a (1, H, W, 3) IMAGE."""
    width, height, margin = 512, 256, 32
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    values = np.log10(np.maximum(np.asarray(losses, dtype=np.float64), 1e-12))
    low, high = float(values.min()), float(values.max())
    span = high - low or 1.0
    points = [(margin + (width - 2 * margin) * i / max(1, len(values) - 1),
               height - margin - (height - 2 * margin) * (v - low) / span) for i, v in enumerate(values)]
    draw.line([(margin, margin), (margin, height - margin), (width - margin, height - margin)], fill="black")
    if len(points) > 1:
        draw.line(points, fill=(30, 90, 200), width=2)
    draw.text((margin + 4, 4), f"loss (log10)  first {losses[0]:.3g}  last {losses[-1]:.3g}", fill="black")
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
                             tooltip="Training iterations. The paper uses 3000; a few hundred already erase on SD1.5."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=0.1, step=1e-5,
                               tooltip="AdamW learning rate (cosine schedule with restarts)."),
                io.Int.Input("rank", default=1, min=1, max=64, tooltip="Rank of the membrane (1 in the paper)."),
                io.Float.Input("alpha", default=1.0, min=0.01, max=64.0, step=0.01,
                               tooltip="Scale numerator: the branch is multiplied by alpha / rank."),
                io.Float.Input("anchor_strength", default=1000.0, min=0.0, max=1e6, step=10.0,
                               tooltip="Weight of Latent Anchoring (lambda, 1000 in the paper). 0 switches it off."),
                io.Int.Input("anchor_samples", default=2, min=0, max=64,
                             tooltip="Surrogate prompts anchored per iteration."),
                io.Combo.Input("surrogate_sampler", options=list(SAMPLERS), default="prompts",
                               tooltip="Where anchors come from. prompts: random real word prompts (ours); gaussian: random "
                                       "directions in embedding space (the official sampler)."),
                io.Float.Input("erase_guidance", default=1.0, min=0.0, max=10.0, step=0.1,
                               tooltip="How far past the neutral prediction the target is pushed (ESD guidance)."),
                io.Int.Input("rollout_steps", default=30, min=2, max=200,
                             tooltip="DDIM steps T of the rollout that makes the training latents (30 in the paper); "
                                     "each iteration rolls out a random 1..T-1 of them."),
                io.Int.Input("latent_size", default=64, min=8, max=256, step=8,
                             tooltip="Latent side used in training: 64 = 512 px (SD1.5), 96 = 768 px (SD2), 128 = 1024 px (SDXL)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Seed: the same seed gives the same membrane."),
                io.String.Input("name", default="my_membrane", tooltip="File name in models/spm (without extension)."),
                io.Boolean.Input("resume", default=False, tooltip="Continue a cancelled run of the same name "
                                                                  "(the .partial.safetensors file of that name) instead of starting over."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace the membrane of that name in models/spm if it exists. Off: an existing membrane is "
                                         "never replaced (training stops with a message before it starts)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the new membrane applied (paper transport)."),
                io.Image.Output(display_name="loss", tooltip="Loss curve."),
                io.String.Output(display_name="path", tooltip="Where the membrane was saved."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, target, surrogate, neutral, iterations, learning_rate, rank, alpha, anchor_strength,
                anchor_samples, surrogate_sampler, erase_guidance, rollout_steps, latent_size, seed, name, resume,
                overwrite=False) -> io.NodeOutput:
        name = paths.safe_stem(name)
        folder = folder_paths.get_folder_paths(paths.FOLDER)[0]
        os.makedirs(folder, exist_ok=True)
        config = TrainingConfig(iterations=iterations, learning_rate=learning_rate, rank=rank, alpha=alpha,
                                erase_guidance=erase_guidance, anchor_strength=anchor_strength, anchor_samples=anchor_samples,
                                rollout_steps=rollout_steps, latent_sizes=[latent_size], seed=seed,
                                surrogates=surrogate_sampler)
        request = TrainingRequest(targets=parse_lines(target, "target"), surrogates=parse_lines(surrogate, "surrogate"),
                                  neutral=neutral.strip(), config=config,
                                  path=os.path.join(folder, name + ".safetensors"), resume=resume, overwrite=overwrite)
        progress = comfy.utils.ProgressBar(iterations)
        started = time.monotonic()

        def on_step(report: StepReport) -> None:
            done = report.iteration + 1
            progress.update_absolute(done, iterations)
            _show_eta(cls.hidden.unique_id, done, iterations, started, report.loss)
            comfy.model_management.throw_exception_if_processing_interrupted()

        membrane, reports, _ = train(model, clip, request, on_step)
        concepts = [encode_concept(clip, p) for c in membrane.concepts for p in c.prompts]
        entry = MembraneEntry(membrane=membrane, strength=1.0, transport=Transport([concepts], TransportMode.PAPER),
                              node_id=cls.hidden.unique_id)
        losses = [r.loss for r in reports] or [0.0]
        return io.NodeOutput(with_membrane(model, entry), loss_curve(losses), request.path,
                             ui={"text": [f"saved {request.path} after {len(reports)} iterations, final loss {losses[-1]:.4g}"]})


def _show_eta(node_id, done: int, total: int, started: float, loss: float) -> None:
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None or node_id is None or (done % max(1, total // 100) and done != total):
        return
    elapsed = time.monotonic() - started
    remaining = elapsed / done * (total - done)
    server.send_progress_text(f"{done}/{total}  loss {loss:.4g}  ETA {remaining:.0f}s", node_id)
