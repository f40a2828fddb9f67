"""Train the miniature world's classifier on degraded procedural renders and procedural garbage, then
report its accuracy on held-out examples (a seed never used in training).

usage: python -m lab.train_classifier [--steps N] [--export PATH] [--threads N]
Plain torch: needs no ComfyUI host.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

from miniworld.classifier import (
    COLOUR_CLASSES,
    GARBAGE_KINDS,
    IGNORE,
    OBJECT_CLASSES,
    Classifier,
    classify,
    garbage_batch,
    labelled_batch,
    load_classifier,
)
from miniworld.model import CLASSIFIER_FILE

TRAIN_SEED, HELD_OUT_SEED = 11, 12345


def train(steps: int, batch: int, lr: float, seed: int) -> Classifier:
    torch.manual_seed(seed)
    classifier = Classifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(TRAIN_SEED)
    t0 = time.time()
    for step in range(steps):
        pictures, objects, colours, striped, clean = labelled_batch(rng, batch)
        object_logits, colour_logits, striped_logits, clean_logits = classifier(pictures)
        has_style = striped != IGNORE
        loss = (torch.nn.functional.cross_entropy(object_logits, objects, ignore_index=IGNORE)
                + torch.nn.functional.cross_entropy(colour_logits, colours, ignore_index=IGNORE)
                + torch.nn.functional.binary_cross_entropy_with_logits(striped_logits[has_style], striped[has_style].float())
                + torch.nn.functional.binary_cross_entropy_with_logits(clean_logits, clean.float()))
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 200 == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    return classifier.eval()


def held_out_report(classifier: Classifier, count: int = 4000, garbage_count: int = 500) -> dict[str, float]:
    """Accuracy per head and per class on `count` held-out examples (degraded renders and garbage),
    and the share read as not clean among `garbage_count` held-out pictures of each garbage kind."""
    rng = np.random.default_rng(HELD_OUT_SEED)
    pictures, objects, colours, striped, clean = labelled_batch(rng, count)
    verdicts = classify(classifier, pictures)
    report: dict[str, float] = {}
    for name in OBJECT_CLASSES:
        rows = [i for i in range(count) if objects[i] != IGNORE and OBJECT_CLASSES[objects[i]] == name]
        report[f"object/{name}"] = float(np.mean([verdicts[i].obj == name for i in rows]))
    for name in COLOUR_CLASSES:
        rows = [i for i in range(count) if colours[i] != IGNORE and COLOUR_CLASSES[colours[i]] == name]
        report[f"colour/{name}"] = float(np.mean([verdicts[i].colour == name for i in rows]))
    rows = [i for i in range(count) if striped[i] != IGNORE]
    report["striped"] = float(np.mean([(verdicts[i].striped_prob >= 0.5) == bool(striped[i]) for i in rows]))
    report["clean/renders"] = float(np.mean([verdicts[i].is_clean for i in range(count) if clean[i]]))
    for kind in GARBAGE_KINDS:
        read = classify(classifier, garbage_batch(rng, kind, garbage_count))
        report[f"not clean/{kind}"] = float(np.mean([not v.is_clean for v in read]))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--export", default=CLASSIFIER_FILE)
    parser.add_argument("--report-only", action="store_true", help="only evaluate the classifier at --export")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.report_only:
        classifier = load_classifier(args.export)
    else:
        import safetensors.torch

        classifier = train(args.steps, args.batch, args.lr, args.seed)
        os.makedirs(os.path.dirname(args.export), exist_ok=True)
        safetensors.torch.save_file({k: v.half().contiguous() for k, v in classifier.state_dict().items()}, args.export)
        classifier = load_classifier(args.export)  # report what is shipped (fp16 weights)
    with torch.no_grad():
        report = held_out_report(classifier)
    print("held-out accuracy (degraded renders; garbage for the clean head):")
    for key, value in report.items():
        print(f"  {key:26s} {value:6.1%}")


if __name__ == "__main__":
    main()
