"""The token gate: how well a prompt's own token vectors match a concept's, for text encoders that
give a sequence of token vectors and no whole-prompt embedding worth comparing (T5 in Flux:
issue 17).

For a concept with content-token vectors c_1..c_k (its encoding without start, end and padding
tokens) and a prompt's conditioning e_1..e_N,

    match(p, c) = max_i mean_j cos(c_j, e_{i+j})

is 1 when the concept's tokens appear in the prompt, in order, with the same vectors, and falls the
less the prompt holds them. In order, because T5's sentencepiece splits rare names into common
pieces ("snoopy" -> 5 pieces): matching each piece anywhere in the prompt opened the gate on
unrelated prompts that share pieces (0.55-0.57 for "a dog" and "a bowl of fruit on a table"
against "snoopy" on the tiny test encoders; in order: 0.30 and 0.35). The prompt's positions are
all used: ComfyUI's CONDITIONING keeps no token ids, so its padding cannot be cut by position.
Padding and end tokens match a concept about as well as the empty prompt's do, so the gate is read
from there:

    relative(p, c) = (match(p, c) - match("", c)) / (1 - match("", c))

0 for a prompt that matches the concept no better than the empty prompt, 1 for one that holds its
tokens; Transport maps it linearly from its token threshold (gate 0) to its token saturation
(gate 1). Unlike the flattened cosine of the paper it does not depend on where in the prompt the
words stand or on how long the prompt is (on Flux's 256-token T5 conditioning the flattened cosine
is 0.97-1.0 for every prompt on the test encoders: padding dominates it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import SPMError

# A concept whose tokens the empty prompt already matches this well gives no usable gate.
MAX_BASELINE = 0.999


def case_variants(text: str) -> list[str]:
    """The concept as written, in lower case, with capitalised words and in upper case, each once.
    T5's vocabulary is case-sensitive and splits a name differently by case ("van gogh" and
    "Van Gogh" share no token), so the token gate compares the prompt with every variant; CLIP
    lower-cases everything."""
    capitalised = " ".join(word[:1].upper() + word[1:] for word in text.split(" "))
    return list(dict.fromkeys((text, text.lower(), capitalised, text.upper())))


def content_vectors(embedding: torch.Tensor, content: tuple[int, int]) -> torch.Tensor:
    """The (k, D) vectors of a concept's content tokens in its (L, D) encoding."""
    start, stop = content
    if not 0 <= start < stop <= embedding.shape[0]:
        raise SPMError(f"the concept's content tokens {start}..{stop} lie outside its {embedding.shape[0]}-token encoding")
    return embedding[start:stop]


class TokenBank:
    """The content-token vectors of C concepts, unit length, each concept's (k_c, D) kept in order,
    with the empty prompt's match of each concept as the baseline."""

    def __init__(self, concepts: Sequence[torch.Tensor], empty: torch.Tensor) -> None:
        if not concepts:
            raise SPMError("the token gate needs at least one concept")
        widths = {vectors.shape[1] for vectors in concepts}
        if len(widths) > 1 or empty.shape[1] not in widths:
            raise SPMError("the concepts and the empty prompt were encoded with different text encoders "
                           f"(widths {sorted(widths | {empty.shape[1]})})")
        lengths = [vectors.shape[0] for vectors in concepts]
        self.vectors = F.normalize(torch.cat([vectors.float() for vectors in concepts]), dim=-1)  # (T, D)
        self.owner = torch.cat([torch.full((k,), c, dtype=torch.long) for c, k in enumerate(lengths)])  # (T,)
        self.place = torch.cat([torch.arange(k) for k in lengths])  # (T,): each token's place in its concept
        self.lengths = torch.tensor(lengths)
        self._on_device: dict[torch.device, torch.Tensor] = {}
        self.baseline = self.match(empty[None])[0]
        if bool((self.baseline > MAX_BASELINE).any()):
            index = int(self.baseline.argmax())
            raise SPMError(f"concept {index + 1}'s tokens are matched by the empty prompt as well as by themselves "
                           "(its prompt has no words of its own?), so the token gate cannot tell prompts apart")

    @property
    def width(self) -> int:
        return self.vectors.shape[1]

    def match(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, C): for each row's conditioning (B, N, D) and each concept, the best mean cosine of the
        concept's k tokens with k consecutive positions of the row."""
        if rows.shape[-1] != self.width:
            raise SPMError(f"prompt embeddings are {rows.shape[-1]} wide but the concept embeddings {self.width}: "
                           "they were encoded with a different text encoder")
        vectors = self._on_device.get(rows.device)
        if vectors is None:
            vectors = self._on_device.setdefault(rows.device, self.vectors.to(rows.device))
        batch, longest = rows.shape[0], int(self.lengths.max())
        positions = max(rows.shape[1], longest)  # window starts considered (the invalid ones masked below)
        cosines = (F.normalize(rows.float(), dim=-1) @ vectors.t()).cpu()  # (B, N, T)
        cosines = F.pad(cosines, (0, 0, 0, positions + longest - rows.shape[1]))  # room for every window
        # window i holds positions i..i+k-1: token j of a concept is read at position i + j
        at = (torch.arange(positions)[:, None] + self.place[None, :]).expand(batch, -1, -1)
        aligned = cosines.gather(1, at)  # (B, windows, T)
        sums = torch.zeros(batch, positions, self.lengths.shape[0]).index_add_(2, self.owner, aligned)
        means = sums / self.lengths
        # a window must lie within the row (or start at 0 when the row is shorter than the concept)
        last = (max(rows.shape[1], 1) - self.lengths).clamp(min=0)  # (C,)
        means = means.masked_fill(torch.arange(positions)[None, :, None] > last[None, None, :], -2.0)
        return means.amax(dim=1)

    def relative(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, C) match measured from the empty prompt's (0) to a perfect match (1), clamped to [0, 1]."""
        return ((self.match(rows) - self.baseline) / (1.0 - self.baseline)).clamp(0.0, 1.0)
