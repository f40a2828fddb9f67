"""When membranes act during sampling: each membrane's range (a share of sampling) and its strength
ramp over that range, which goes linearly from its value at the range's start to its value at the
range's end."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .choice import Choice
from .errors import SPMError


class Ramp(Choice):
    CONSTANT = "constant", "full strength over the whole range"
    FADE_IN = "fade in", "0 at the start of the range, full strength at its end (the membrane acts on details)"
    FADE_OUT = "fade out", "full strength at the start, 0 at the end (the membrane acts on composition)"

    def factor(self, percent: float, start: float, end: float) -> float:
        """The share of the strength at `percent` of sampling, for a membrane acting from `start` to `end`."""
        if self is Ramp.CONSTANT:
            return 1.0
        progress = min(1.0, max(0.0, (percent - start) / (end - start))) if end > start else 0.0
        return progress if self is Ramp.FADE_IN else 1.0 - progress


class SamplingSchedule:
    """When each membrane of a chain acts and how strongly: its start..end share of sampling and its
    ramp, read at a step's sigma through the model's own percent -> sigma map
    (`model_sampling.percent_to_sigma`), tabulated once per map rather than on every model call."""

    def __init__(self, ranges: Sequence[tuple[float, float, Ramp]]) -> None:
        for start, end, _ in ranges:
            if not 0.0 <= start <= end <= 1.0:
                raise SPMError(f"sampling range {start}..{end} is invalid; need 0 <= start <= end <= 1")
        self.ranges = tuple(ranges)
        self.ramped = any(ramp is not Ramp.CONSTANT for _, _, ramp in self.ranges)
        self._bounds: tuple[object, torch.Tensor, torch.Tensor] | None = None
        self._percents: tuple[object, list[float], list[float]] | None = None

    def active(self, sigma: float, model_sampling) -> torch.Tensor:
        """(membranes,) 1 for membranes whose range covers this sigma, else 0."""
        if self._bounds is None or self._bounds[0] is not model_sampling:
            high = torch.tensor([float(model_sampling.percent_to_sigma(start)) for start, _, _ in self.ranges])
            low = torch.tensor([float(model_sampling.percent_to_sigma(end)) for _, end, _ in self.ranges])
            self._bounds = (model_sampling, low, high)
        _, low, high = self._bounds
        return ((low <= sigma) & (sigma <= high)).float()

    def factors(self, sigma: float, model_sampling) -> torch.Tensor:
        """(membranes,) each membrane's share of its strength at this sigma (its ramp)."""
        if self._percents is None or self._percents[0] is not model_sampling:
            percents = [i / 200 for i in range(1, 200)]  # 0 and 1 map to infinite / zero sigma
            sigmas = [float(model_sampling.percent_to_sigma(p)) for p in percents]
            self._percents = (model_sampling, sigmas[::-1], percents[::-1])  # increasing sigma
        _, sigmas, percents = self._percents
        percent = float(np.interp(sigma, sigmas, percents))
        return torch.tensor([ramp.factor(percent, start, end) for start, end, ramp in self.ranges])
