"""How far a membrane has erased its concept, measured on the model alone (no classifier).

At a few fixed probes (latents on the bare model's own CFG trajectories for the target, where the
concept is being drawn), three noise predictions per probe:
  e_pos  bare model, positive prompt (the concept as the bare model draws it),
  e_neu  bare model, neutral prompt (or an edit's surrogate),
  e_on   membrane on, target prompt.
The level is the share of the way from e_pos to e_neu that e_on has travelled, along that line:

    level = sum_probes <e_on - e_pos, e_neu - e_pos> / sum_probes ||e_neu - e_pos||²

0: the target is predicted as the bare model predicts it; 1: as the neutral prompt. Training aims
at e_neu - g (e_pos - e_neu), i.e. level 1 + g (2 at the default erase guidance 1), so a trained
membrane can read above 1. A distance to e_neu (1 - ||e_on - e_neu|| / ||e_pos - e_neu||) would
not do: the training target is as far from e_neu as e_pos is (at g = 1), so that measure reads 0
both before training and at its goal. Sums are pooled over probes rather than ratios averaged, so
a probe where the two prompts barely differ (late, low-noise steps) weighs little instead of
dividing by almost nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import SPMError
from .surrogates import Prompt

if TYPE_CHECKING:  # training.py measures erasure with this module while it trains
    from .training import ConceptPrompts, NoisePredictor


@dataclass(frozen=True)
class Probe:
    """One fixed point where the measure is taken."""

    x: torch.Tensor      # (1, C, H, W) latent
    sigma: torch.Tensor  # (1,) its noise level


@torch.no_grad()
def make_probes(model: NoisePredictor, target: Prompt, empty: Prompt, size: int, seeds: Sequence[int],
                rollout_steps: int, cfg: float, at_steps: Sequence[int]) -> list[Probe]:
    """Latents on the bare model's deterministic CFG trajectories for the target (as training rolls
    out, with the membrane off: call it before the membrane is switched on), one trajectory per seed,
    taken after each of `at_steps` of `rollout_steps` steps. Fixed probes make levels taken at
    different iterations comparable. All seeds run as one batch."""
    if not seeds or not at_steps:
        raise SPMError("the erasure measure needs at least one seed and one step")
    if any(not 0 <= k < rollout_steps for k in at_steps):
        raise SPMError(f"probe steps {list(at_steps)} must lie in [0, {rollout_steps})")
    sigmas = model.sigmas(rollout_steps).float()
    noise = torch.cat([torch.randn(1, model.latent_channels, size, size, generator=torch.Generator().manual_seed(s))
                       for s in seeds])
    x = model.start(noise, sigmas[0])
    count = len(seeds)
    taken: dict[int, torch.Tensor] = {}
    last = max(at_steps)
    for i in range(last + 1):
        if i in at_steps:
            taken[i] = x
        if i == last:
            break
        both = model.eps(torch.cat([x, x]), sigmas[i:i + 1].repeat(2 * count), [empty] * count + [target] * count)
        uncond, cond = both[:count], both[count:]
        x = x + (sigmas[i + 1] - sigmas[i]) * (uncond + cfg * (cond - uncond))
    return [Probe(taken[k][row:row + 1], sigmas[k:k + 1]) for k in at_steps for row in range(count)]


@dataclass(frozen=True)
class Predictions:
    """The three predictions at every probe, (probes, C, H, W) each."""

    on: torch.Tensor
    positive: torch.Tensor
    neutral: torch.Tensor


@torch.no_grad()
def predict(model: NoisePredictor, set_membrane: Callable[[bool], None], concept: ConceptPrompts,
            probes: Sequence[Probe]) -> Predictions:
    """One batched call with the membrane off (positive and neutral rows), one with it on (target
    rows); the membrane is left off."""
    count = len(probes)
    x, sigma = torch.cat([p.x for p in probes]), torch.cat([p.sigma for p in probes])
    set_membrane(False)
    off = model.eps(torch.cat([x, x]), torch.cat([sigma, sigma]), [concept.positive] * count + [concept.neutral] * count)
    set_membrane(True)
    try:
        on = model.eps(x, sigma, [concept.target] * count)
    finally:
        set_membrane(False)
    return Predictions(on.float(), off[:count].float(), off[count:].float())


def level_of(predictions: Predictions) -> float:
    """The pooled projection of the module docstring."""
    moved = (predictions.on - predictions.positive).flatten()
    line = (predictions.neutral - predictions.positive).flatten()
    return float(moved @ line / (line @ line).clamp(min=torch.finfo(torch.float32).tiny))


def erasure_level(model: NoisePredictor, set_membrane: Callable[[bool], None], concept: ConceptPrompts,
                  probes: Sequence[Probe]) -> float:
    """0 = the target is predicted as by the bare model, 1 = as the neutral/surrogate prompt
    (training aims at 1 + erase guidance). Costs 3 x len(probes) rows in two calls."""
    return level_of(predict(model, set_membrane, concept, probes))
