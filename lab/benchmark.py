"""The erasure benchmark's measurements: what a setup does to the prompts that ask for an erased
concept (erasure), to prompts that don't (preservation), and to prompts that ask for it in words
the membrane never saw (paraphrase attack).

Every prompt is sampled `count` times from a seed fixed by its text, so every setup starts from
the same noise and pixel distances to the bare model compare like with like. Pictures are read by
the classifier; a concept is "found" at probability >= 0.5. A concept is erased from a generation
only when the picture is clean (the classifier's clean head) and the concept is not found: a
membrane that turns its concept into noise has not erased it, and that share is reported on its own.
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from miniworld.classifier import Verdict
from miniworld.world import Request, evaluation_prompts

from .evaluate import request_accuracy
from .paraphrases import paraphrases
from .setups import Bare


@dataclass(frozen=True)
class Reading:
    pictures: torch.Tensor
    verdicts: list[Verdict]


class Evaluator:
    """Generates and reads pictures, once per (setup key, prompt)."""

    def __init__(self, lab, count: int) -> None:
        self.lab, self.count = lab, count
        self.bare = Bare(lab)
        self._readings: dict[tuple[Hashable, str], Reading] = {}
        self.generations = 0

    @staticmethod
    def seed_for(text: str) -> int:
        return zlib.crc32(text.encode()) % 1_000_000

    def read(self, setup, text: str) -> Reading:
        key = setup.key_for(text)
        if key is not None and (key, text) in self._readings:
            return self._readings[(key, text)]
        pictures = self.lab.generate(setup.model_for(text), text, self.count, self.seed_for(text))
        reading = Reading(pictures, self.lab.read(pictures))
        self.generations += self.count
        if key is not None:
            self._readings[(key, text)] = reading
        return reading


def spread(items: Sequence, count: int) -> list:
    """`count` items taken evenly through the sequence (all of them if it is shorter)."""
    if len(items) <= count:
        return list(items)
    return [items[(i * len(items)) // count] for i in range(count)]


@dataclass(frozen=True)
class Panel:
    """The prompts one erased concept is measured on."""

    concept: str
    targets: list[Request]      # evaluation prompts naming the concept
    others: list[Request]       # evaluation prompts naming none of the erased concepts
    paraphrases: list[Request]  # the concept asked for in words its membrane never saw


def panel(concept: str, erased: Sequence[str], target_count: int, other_count: int) -> Panel:
    requests = evaluation_prompts()
    targets = [r for r in requests if concept in r.concepts]
    others = [r for r in requests if not set(erased) & set(r.concepts)]
    return Panel(concept, spread(targets, target_count), spread(others, other_count), paraphrases(concept, targets))


@dataclass
class Measure:
    """One setup on one concept's panel."""

    setup: str
    concept: str
    erased: float            # share of target generations that are clean pictures without the concept
    erased_n: int
    erased_into_noise: float  # share of target generations that are not clean pictures
    accuracy: float          # share of other-prompt generations showing everything they ask for
    bare_accuracy: float
    drift: float             # mean absolute pixel difference to the bare model on other prompts (0..1)
    attack: float            # share of paraphrase generations in which the concept is found
    attack_n: int
    bare_attack: float       # the same for the bare model: how often the paraphrase draws it at all


def found_share(verdicts: Sequence[Verdict], concept: str) -> float:
    return sum(v.finds(concept) for v in verdicts) / len(verdicts)


def erased_share(verdicts: Sequence[Verdict], concept: str) -> float:
    """Share of generations that are a clean picture in which `concept` is not found."""
    return sum(v.is_clean and not v.finds(concept) for v in verdicts) / len(verdicts)


def not_clean_share(verdicts: Sequence[Verdict]) -> float:
    return sum(not v.is_clean for v in verdicts) / len(verdicts)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def measure(evaluator: Evaluator, setup, p: Panel, with_paraphrases: bool = True, bare=None) -> Measure:
    """`bare`: the setup to compare with (default: the shipped model without membranes)."""
    bare = bare or evaluator.bare
    targets = [evaluator.read(setup, r.text) for r in p.targets]
    others = [(r, evaluator.read(setup, r.text), evaluator.read(bare, r.text)) for r in p.others]
    attacks = [(evaluator.read(setup, r.text), evaluator.read(bare, r.text)) for r in p.paraphrases] if with_paraphrases else []
    return Measure(
        setup=setup.label, concept=p.concept,
        erased=mean([erased_share(t.verdicts, p.concept) for t in targets]), erased_n=evaluator.count * len(targets),
        erased_into_noise=mean([not_clean_share(t.verdicts) for t in targets]),
        accuracy=mean([request_accuracy(o.verdicts, r) for r, o, _ in others]),
        bare_accuracy=mean([request_accuracy(b.verdicts, r) for r, _, b in others]),
        drift=mean([float((o.pictures - b.pictures).abs().mean()) for _, o, b in others]),
        attack=mean([found_share(a.verdicts, p.concept) for a, _ in attacks]), attack_n=evaluator.count * len(attacks),
        bare_attack=mean([found_share(b.verdicts, p.concept) for _, b in attacks]))


@dataclass
class StackMeasure:
    """Several membranes at once, on every evaluation prompt."""

    setup: str
    erased: dict[str, float]         # per erased concept, over the prompts naming it: clean and not found
    erased_into_noise: dict[str, float]  # per erased concept, over the prompts naming it: not clean
    kept_found: dict[str, float]     # per kept concept, over every prompt naming it
    accuracy: float                  # prompts naming no erased concept: everything found
    bare_accuracy: float
    drift: float
    attack: float                    # paraphrases of every erased concept: share still found
    bare_attack: float
    # per membrane (by its concept), the mean gate it took on the prompts that do not name its concept;
    # empty for setups without per-membrane gates (the official merge)
    off_target_gate: dict[str, float] = field(default_factory=dict)
    # (prompt, membrane, gate) wherever a membrane opened at least halfway on a prompt not naming its concept
    opened_off_target: list[tuple[str, str, float]] = field(default_factory=list)


def prompt_gates(setup, text: str) -> list[float] | None:
    """(membranes,) the gates `setup`'s membranes took on `text`'s positive row, read right after it
    was sampled: for a latent gate those measured in that run, else the text gates (which a cached
    reading shares); None for a setup without SPM Load Membrane gates."""
    state = getattr(setup, "state", None)
    if state is None:
        return None
    if state.reads_model:
        return list(state.last_gates.get("positive", []))
    return [float(g) for g in setup.gates(text)]


def off_target_gates(gates: dict[str, list[float]], requests: Sequence[Request], membranes: Sequence[str]
                     ) -> tuple[dict[str, float], list[tuple[str, str, float]]]:
    """From each prompt's gates (in `membranes` order): each membrane's mean gate over the prompts
    not naming its concept, and every such gate of at least 0.5 (prompt, membrane, gate)."""
    means, opened = {}, []
    for index, name in enumerate(membranes):
        others = [r for r in requests if name not in r.concepts and r.text in gates]
        means[name] = mean([gates[r.text][index] for r in others])
        opened += [(r.text, name, round(gates[r.text][index], 3)) for r in others if gates[r.text][index] >= 0.5]
    return means, opened


def measure_stack(evaluator: Evaluator, setup, erased: Sequence[str], kept: Sequence[str],
                  attack_prompts: dict[str, list[Request]]) -> StackMeasure:
    """`setup`'s membranes erase `erased`, in that order (one membrane per concept)."""
    bare = evaluator.bare
    requests = evaluation_prompts()
    readings, gates = {}, {}
    for r in requests:
        readings[r.text] = evaluator.read(setup, r.text)
        used = prompt_gates(setup, r.text)
        if used is not None:
            gates[r.text] = used
    off_target, opened = off_target_gates(gates, requests, erased) if gates else ({}, [])
    clean = [r for r in requests if not set(erased) & set(r.concepts)]
    attacks = [(c, evaluator.read(setup, r.text), evaluator.read(bare, r.text))
               for c, prompts in attack_prompts.items() for r in prompts]
    return StackMeasure(
        setup=setup.label,
        erased={c: mean([erased_share(readings[r.text].verdicts, c) for r in requests if c in r.concepts]) for c in erased},
        erased_into_noise={c: mean([not_clean_share(readings[r.text].verdicts) for r in requests if c in r.concepts])
                           for c in erased},
        kept_found={c: mean([found_share(readings[r.text].verdicts, c) for r in requests if c in r.concepts]) for c in kept},
        accuracy=mean([request_accuracy(readings[r.text].verdicts, r) for r in clean]),
        bare_accuracy=mean([request_accuracy(evaluator.read(bare, r.text).verdicts, r) for r in clean]),
        drift=mean([float((readings[r.text].pictures - evaluator.read(bare, r.text).pictures).abs().mean()) for r in clean]),
        attack=mean([found_share(a.verdicts, c) for c, a, _ in attacks]),
        bare_attack=mean([found_share(b.verdicts, c) for c, _, b in attacks]),
        off_target_gate=off_target, opened_off_target=opened)
