"""SPM Transport Inspector: the gate each membrane would get for each conditioning."""

from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageDraw, ImageFont

from .encode import TOKENS_KEY
from .runtime import state_of


def gate_table(model, conditionings: dict[str, list]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per membrane, one column per conditioning entry."""
    state = state_of(model)
    columns, gates = [], []
    for label, conditioning in conditionings.items():
        for index, (embedding, options) in enumerate(conditioning):
            columns.append(label if len(conditioning) == 1 else f"{label}[{index}]")
            gates.append(state.gates_for(embedding[:1].float().cpu(), options.get(TOKENS_KEY))[0])
    header = ["membrane", "transport", *columns]
    rows = [[entry.label, entry.transport.mode.value, *(f"{g[i].item():.3f}" for g in gates)]
            for i, entry in enumerate(state.entries)]
    return header, rows


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
            ],
            outputs=[
                io.String.Output(display_name="table", tooltip="The gate table as text."),
                io.Image.Output(display_name="image", tooltip="The gate table as an image."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative=None) -> io.NodeOutput:
        conditionings = {"positive": positive} if negative is None else {"positive": positive, "negative": negative}
        text = as_text(*gate_table(model, conditionings))
        return io.NodeOutput(text, as_image(text), ui={"text": [text]})
