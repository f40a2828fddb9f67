"""Figures for the README, PIL only: the miniature model's training loss curve, and the erasure
benchmark's erasure against preservation per setup.

usage: python -m miniworld.plots LOSS_CSV OUT_PNG          (from miniworld.train_model)
       python -m miniworld.plots BENCHMARK_JSON OUT_PNG    (from scripts/erasure_benchmark.py --json)
"""

from __future__ import annotations

import csv
import json
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


def benchmark_figure(json_path: str, png_path: str) -> None:
    """Each single-membrane setup (mean over its concepts) and each stack of membranes as a point:
    share of target generations erased (up is better) against the mean pixel drift from the bare
    model on prompts without the target (left is better)."""
    with open(json_path, encoding="utf-8") as handle:
        results = json.load(handle)
    points = [(label, row["drift"], row["erased"], (30, 90, 200)) for label, row in results["singles_summary"].items()]
    for stack in results.get("stacks", []):
        erased = sum(stack["erased"].values()) / len(stack["erased"])
        points.append((f"{stack['membranes']} at once: {stack['setup']}", stack["drift"], erased, (200, 60, 30)))
    width, height, margin = 760, 460, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    high_drift = max(d for _, d, _, _ in points) * 1.1
    low_erased = min(0.5, min(e for _, _, e, _ in points) - 0.05)

    def xy(drift, erased):
        return (margin + (width - 2 * margin) * drift / high_drift,
                height - margin - (height - 2 * margin) * (erased - low_erased) / (1 - low_erased))

    draw.line([(margin, margin), (margin, height - margin), (width - margin, height - margin)], fill="black")
    for value in (low_erased, (low_erased + 1) / 2, 1.0):
        draw.text((8, xy(0, value)[1] - 6), f"{value:.0%}", fill="black")
    draw.text((width - margin - 60, height - margin + 10), f"{high_drift:.3f}", fill="black")
    draw.text((margin, height - margin + 24), "mean pixel drift from the bare model on other prompts (left is better)",
              fill="black")
    draw.text((margin, 12), "miniature world: share of target generations erased (up is better); blue: one membrane "
                            "(mean over concepts), red: several at once", fill="black")
    for label, drift, erased, colour in points:
        x, y = xy(drift, erased)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        draw.text((x + 7, y - 6), label, fill=colour)
    image.save(png_path)


if __name__ == "__main__":
    (benchmark_figure if sys.argv[1].endswith(".json") else loss_curve)(sys.argv[1], sys.argv[2])
