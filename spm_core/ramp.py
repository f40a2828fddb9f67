"""Strength ramps over a membrane's sampling range: the strength goes linearly from its value at
the range's start to its value at the range's end."""

from __future__ import annotations

from .choice import Choice


class Ramp(Choice):
    CONSTANT = "constant"
    FADE_IN = "fade in"
    """0 at the start of the range, full strength at its end (the membrane acts on details)."""
    FADE_OUT = "fade out"
    """full strength at the start, 0 at the end (the membrane acts on composition)."""

    def factor(self, percent: float, start: float, end: float) -> float:
        """The share of the strength at `percent` of sampling, for a membrane acting from `start` to `end`."""
        if self is Ramp.CONSTANT:
            return 1.0
        progress = min(1.0, max(0.0, (percent - start) / (end - start))) if end > start else 0.0
        return progress if self is Ramp.FADE_IN else 1.0 - progress
