"""Figures for the README, PIL only: the miniature model's training loss curve, and the erasure
benchmark's erasure against preservation per setup.

usage: python -m lab.plots LOSS_CSV OUT_PNG          (from lab.train_model)
       python -m lab.plots BENCHMARK_JSON OUT_PNG    (from scripts/erasure_benchmark.py --json)
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
    """Each single-membrane setup (mean over the concepts every setup was run on) and each stack of
    membranes as a numbered point: share of target generations erased (up is better) against the
    mean pixel drift from the bare model on prompts without the target (left is better)."""
    with open(json_path, encoding="utf-8") as handle:
        results = json.load(handle)
    singles = results["singles"]
    labels = list(dict.fromkeys(m["setup"] for m in singles))
    shared = set.intersection(*({m["concept"] for m in singles if m["setup"] == label} for label in labels))
    points = []
    for label in labels:
        rows = [m for m in singles if m["setup"] == label and m["concept"] in shared]
        points.append((label, sum(m["drift"] for m in rows) / len(rows), sum(m["erased"] for m in rows) / len(rows),
                       (30, 90, 200)))
    for stack in results.get("stacks", []):
        erased = sum(stack["erased"].values()) / len(stack["erased"])
        points.append((f"{stack['membranes']} at once: {stack['setup']}", stack["drift"], erased, (200, 60, 30)))
    width, height, margin, plot_width = 900, 420, 60, 480
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    high_drift = max(d for _, d, _, _ in points) * 1.1
    low_erased = max(0.0, min(e for _, _, e, _ in points) - 0.05)

    def xy(drift, erased):
        return (margin + plot_width * drift / high_drift,
                height - margin - (height - 2 * margin) * (erased - low_erased) / (1 - low_erased))

    draw.line([(margin, margin), (margin, height - margin), (margin + plot_width, height - margin)], fill="black")
    for value in (low_erased, (low_erased + 1) / 2, 1.0):
        draw.text((8, xy(0, value)[1] - 6), f"{value:.0%}", fill="black")
    draw.text((margin + plot_width - 30, height - margin + 8), f"{high_drift:.3f}", fill="black")
    draw.text((margin, height - margin + 24), "mean pixel drift from the bare model on other prompts (left is better)",
              fill="black")
    draw.text((margin, 12), f"miniature world: share of target generations erased (up is better). Blue: one membrane, "
                            f"mean over {', '.join(sorted(shared))}; red: several at once", fill="black")
    for number, (label, drift, erased, colour) in enumerate(points, start=1):
        x, y = xy(drift, erased)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        draw.text((x + 6, y - 12), str(number), fill=colour)
        draw.text((margin + plot_width + 20, margin + 18 * (number - 1)),
                  f"{number:>2}. {label}: {erased:.1%}, {drift:.3f}", fill=colour)
    image.save(png_path)


if __name__ == "__main__":
    (benchmark_figure if sys.argv[1].endswith(".json") else loss_curve)(sys.argv[1], sys.argv[2])
