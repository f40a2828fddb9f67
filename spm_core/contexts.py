"""The concept in context: training prompts that name the concept among other words.

A membrane trained on the concept's own prompt alone learns that prompt: in the miniature world a
"cross" membrane erased "a cross" but left half of "a red cross" drawn. A context pairs
"<words> <concept>" with "<words> <neutral>" (for an edit, the surrogate in the concept's place),
the words drawn at random from the tokenizer's vocabulary; the membrane is taught to erase the
concept from the first as from the bare prompt, with the erase target built from the second, so
what it learns is the concept, not one sentence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .concepts import Concept
from .errors import SPMError
from .surrogates import Prompt


@dataclass(frozen=True)
class ContextPair:
    named: Prompt    # the words with the concept
    neutral: Prompt  # the same words with the neutral prompt (an edit's surrogate) in its place


def context_texts(concept: Concept, words: Sequence[str]) -> list[tuple[str, str]]:
    """(named, neutral) prompt texts for each of `words` (a few vocabulary words each)."""
    replacement = concept.surrogate or concept.neutral or ""
    return [(f"{w} {concept.target}", f"{w} {replacement}".strip()) for w in words]


class ContextPrompts:
    """Context pairs for each concept, each pair encoded the first time it is drawn."""

    def __init__(self, texts: Sequence[Sequence[tuple[str, str]]], encode: Callable[[str], Prompt]) -> None:
        if not texts or not all(texts):
            raise SPMError("every concept needs at least one context prompt")
        self.texts, self.encode = [list(t) for t in texts], encode
        self._encoded: dict[tuple[int, int], ContextPair] = {}

    def sample(self, concept_index: int, count: int, generator: torch.Generator) -> list[ContextPair]:
        pool = self.texts[concept_index]
        picks = torch.randint(len(pool), (count,), generator=generator).tolist()
        for index in picks:
            if (concept_index, index) not in self._encoded:
                named, neutral = pool[index]
                self._encoded[concept_index, index] = ContextPair(self.encode(named), self.encode(neutral))
        return [self._encoded[concept_index, i] for i in picks]
