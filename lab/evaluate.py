"""Measures on generated pictures: what the classifier finds, per prompt, per concept, per family."""

from __future__ import annotations

import math
from collections.abc import Sequence

from miniworld.classifier import Verdict
from miniworld.world import CONCEPTS, FAMILIES, Request

Readings = dict[str, list[Verdict]]  # prompt text -> one verdict per generation


def generate_and_read(lab, model, requests: Sequence[Request], count: int, seed: int = 0) -> Readings:
    """`count` generations per request at fixed seeds (request i uses seed + i: the same starting
    noise for every model), read by the classifier."""
    return {r.text: lab.read(lab.generate(model, r.text, count, seed + i)) for i, r in enumerate(requests)}


def request_accuracy(verdicts: list[Verdict], request: Request) -> float:
    """Share of generations in which every concept the prompt names is found."""
    return sum(all(v.finds(c) for c in request.concepts) for v in verdicts) / len(verdicts)


def concept_accuracy(readings: Readings, requests: Sequence[Request]) -> dict[str, float]:
    """Per concept: share of generations, over prompts naming it, in which it is found."""
    found: dict[str, list[bool]] = {}
    for request in requests:
        for concept in request.concepts:
            found.setdefault(concept, []).extend(v.finds(concept) for v in readings[request.text])
    return {c.name: sum(found[c.name]) / len(found[c.name]) for c in CONCEPTS if c.name in found}


def family_accuracy(per_concept: dict[str, float]) -> dict[str, float]:
    return {family: sum(per_concept[c.name] for c in CONCEPTS if c.family == family and c.name in per_concept)
            / sum(1 for c in CONCEPTS if c.family == family and c.name in per_concept) for family in FAMILIES}


def wilson_interval(share: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a proportion measured on n samples."""
    if n == 0:
        return (0.0, 1.0)
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))
