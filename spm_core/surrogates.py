"""Surrogate conditionings for Latent Anchoring: prompts the membrane must leave alone.

Two samplers, selectable by name:
  gaussian  the official sampler: random Gaussian directions in the flattened (tokens x width)
            embedding space, each accepted with probability 1 - cos(direction, target) and rescaled
            to U[0.8, 1.2] x ||target||. In that many dimensions the test almost never rejects, so
            the anchors are random directions, far from any real prompt.
  prompts   ours: real prompts made of random words from the tokenizer's vocabulary (words of the
            target left out), encoded once by the text encoder. The anchors then lie where real
            prompts lie, which is what the membrane must not disturb.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import SPMError


@dataclass(frozen=True)
class Prompt:
    """An encoded prompt: (tokens, width) embedding and, for SDXL, the pooled vector."""

    embedding: torch.Tensor
    pooled: torch.Tensor | None = None


class GaussianSurrogates:
    def __init__(self, target: Prompt) -> None:
        self.target = target

    def sample(self, count: int, generator: torch.Generator) -> list[Prompt]:
        target = self.target.embedding.float()
        flat_target = target.flatten()
        norm = flat_target.norm()
        anchors: list[Prompt] = []
        while len(anchors) < count:
            direction = torch.randn(flat_target.shape, generator=generator)
            cosine = torch.nn.functional.cosine_similarity(direction, flat_target, dim=0).clamp(min=0.0)
            if torch.rand((), generator=generator) > 1.0 - cosine:
                continue
            scale = norm * (0.8 + 0.4 * torch.rand((), generator=generator)) / direction.norm()
            pooled = None
            if self.target.pooled is not None:
                pooled_direction = torch.randn(self.target.pooled.shape, generator=generator)
                pooled = pooled_direction * self.target.pooled.float().norm() / pooled_direction.norm()
            anchors.append(Prompt((direction * scale).reshape(target.shape), pooled))
        return anchors


class PromptSurrogates:
    """Anchors drawn from a pool of real prompts, each encoded the first time it is drawn (a full
    text encoder on a CPU takes a noticeable fraction of a second per prompt)."""

    def __init__(self, texts: Sequence[str], encode: Callable[[str], Prompt]) -> None:
        if not texts:
            raise SPMError("the surrogate prompt pool is empty")
        self.texts, self.encode = list(texts), encode
        self._encoded: dict[int, Prompt] = {}

    def sample(self, count: int, generator: torch.Generator) -> list[Prompt]:
        picks = torch.randint(len(self.texts), (count,), generator=generator).tolist()
        for index in picks:
            if index not in self._encoded:
                self._encoded[index] = self.encode(self.texts[index])
        return [self._encoded[i] for i in picks]


def random_word_prompts(words: Sequence[str], avoid: set[str], count: int, seed: int,
                        words_per_prompt: tuple[int, int] = (1, 4)) -> list[str]:
    """`count` prompts of 1-4 random vocabulary words, none of them in `avoid`."""
    allowed = [w for w in words if w.lower() not in avoid]
    if not allowed:
        raise SPMError("no vocabulary words left for surrogate prompts")
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(count):
        length = int(torch.randint(words_per_prompt[0], words_per_prompt[1] + 1, (), generator=generator))
        picks = torch.randint(len(allowed), (length,), generator=generator).tolist()
        prompts.append(" ".join(allowed[i] for i in picks))
    return prompts


SAMPLERS = ("prompts", "gaussian")


def make_sampler(name: str, target: Prompt, texts: Callable[[], Sequence[str]], encode: Callable[[str], Prompt]):
    """The sampler called `name`; `texts` (the prompt pool) is only asked for by the prompt sampler."""
    if name == "gaussian":
        return GaussianSurrogates(target)
    if name == "prompts":
        return PromptSurrogates(texts(), encode)
    raise SPMError(f"unknown surrogate sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
