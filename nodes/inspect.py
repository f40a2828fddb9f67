"""SPM Transport Inspector: the gate each membrane would get for each conditioning."""

from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageDraw, ImageFont

from .encode import TOKENS_KEY
from .runtime import state_of


def gate_table(model, conditionings: dict[str, list], latent: dict | None = None,
               seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per membrane, one column per conditioning entry. Latent and guarded
    transport also show what the bare model answers at the first step of sampling `latent` with
    `seed` (guarded: and the breach, where there is one); without a latent such membranes are
    marked as showing the text gate alone."""
    state = state_of(model)
    columns, gates, breaches = [], [], []
    for label, conditioning in conditionings.items():
        for index, (embedding, options) in enumerate(conditioning):
            columns.append(label if len(conditioning) == 1 else f"{label}[{index}]")
            gate = state.gates_for(embedding[:1].float().cpu(), options.get(TOKENS_KEY))[0]
            breach = torch.zeros_like(gate)
            if state.reads_model and latent is not None:
                latent_gate, breach = first_step_latent_gates(model, [embedding, options], latent, seed)
                gate = torch.maximum(gate, latent_gate)
            gates.append(gate)
            breaches.append(breach)
    header = ["membrane", "transport", *columns]
    rows = [[entry.label, _transport_label(entry, latent),
             *(f"{g[i].item():.3f}" + (f" (breach {b[i].item():.2f})" if b[i] > 0 else "") for g, b in zip(gates, breaches))]
            for i, entry in enumerate(state.entries)]
    return header, rows


def _transport_label(entry, latent: dict | None) -> str:
    if entry.transport.reads_model and latent is None:
        return f"{entry.transport.mode.value} (text gate only: connect the latent)"
    return entry.transport.mode.value


def first_step_latent_gates(model, entry: list, latent: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(membranes,) the latent gates and the guarded membranes' breaches (0 for the others) a
    full-denoise run from `latent` with `seed` measures for this conditioning entry: its first step,
    run through ComfyUI's own guider (cfg 1: the entry alone)."""
    import comfy.sample
    import comfy.samplers

    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 1)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds([entry], [])
    guider.set_cfg(1.0)
    guider.sample(noise, samples, comfy.samplers.sampler_object("euler"), sigmas, seed=seed, disable_pbar=True)
    state = state_of(model)
    breaches = state.measured_breaches()
    return state.measured_latent_gates()[0][0], breaches[0][0] if breaches else torch.zeros(len(state.entries))


def as_text(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in [header, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def as_image(text: str) -> torch.Tensor:
    """The table drawn as a (1, H, W, 3) IMAGE."""
    font = ImageFont.load_default()
    lines = text.splitlines()
    width = 16 + 7 * max(len(line) for line in lines)
    height = 16 + 16 * len(lines)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for index, line in enumerate(lines):
        draw.text((8, 8 + 16 * index), line, fill="black", font=font)
    return image_tensor(image)


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as ComfyUI's IMAGE: (1, H, W, 3) floats in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


class SPMTransportInspector(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SPMTransportInspector",
            display_name="SPM Transport Inspector",
            category="conditioning/spm",
            description="Shows how far each membrane opens for the given prompts.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="A model with membranes (from SPM Load Membrane)."),
                io.Conditioning.Input("positive", tooltip="Positive prompt conditioning."),
                io.Conditioning.Input("negative", optional=True, tooltip="Negative prompt conditioning (optional)."),
                io.Latent.Input("latent", optional=True,
                                tooltip="The latent your sampler starts from (with its seed below): membranes with "
                                        "transport latent or guarded then show the gate sampling measures at its first "
                                        "step (guarded: and the breach), not only the text gate. Costs one model step "
                                        "per prompt, and the look-aheads."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, optional=True, control_after_generate=True,
                             tooltip="The sampler's noise seed, used with the latent input."),
            ],
            outputs=[
                io.String.Output(display_name="table", tooltip="The gate table as text."),
                io.Image.Output(display_name="image", tooltip="The gate table as an image."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative=None, latent=None, seed=0) -> io.NodeOutput:
        conditionings = {"positive": positive} if negative is None else {"positive": positive, "negative": negative}
        text = as_text(*gate_table(model, conditionings, latent, seed))
        return io.NodeOutput(text, as_image(text), ui={"text": [text]})
