"""The miniature model's training loss curve as a PNG (PIL only).

usage: python -m miniworld.plots LOSS_CSV OUT_PNG
"""

from __future__ import annotations

import csv
import math
import sys

from PIL import Image, ImageDraw


def loss_curve(csv_path: str, png_path: str) -> None:
    with open(csv_path, newline="") as handle:
        rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(handle)]
    width, height, margin = 640, 300, 48
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    steps = [s for s, _ in rows]
    logs = [math.log10(v) for _, v in rows]
    low, high = min(logs), max(logs)

    def xy(step, value):
        x = margin + (width - 2 * margin) * (step - steps[0]) / max(1, steps[-1] - steps[0])
        y = height - margin - (height - 2 * margin) * (value - low) / max(1e-9, high - low)
        return x, y

    draw.line([(margin, margin), (margin, height - margin), (width - margin, height - margin)], fill="black")
    draw.line([xy(s, v) for s, v in zip(steps, logs)], fill=(30, 90, 200), width=2)
    for value in (low, (low + high) / 2, high):
        draw.text((4, xy(steps[0], value)[1] - 6), f"{10 ** value:.3f}", fill="black")
    draw.text((margin, 12), f"miniature model: training loss (noise MSE, mean of 25 steps, log scale); "
                            f"final {rows[-1][1]:.4f}", fill="black")
    draw.text((width - margin - 60, height - margin + 10), f"{steps[-1]} steps", fill="black")
    image.save(png_path)


if __name__ == "__main__":
    loss_curve(sys.argv[1], sys.argv[2])
