"""Prompts with free token embeddings for adversarial training (spm_core.training.SoftPrompts), encoded
by the checkpoint's own text encoder through ComfyUI's own path: a tensor in a token list is what
an `embedding:` file puts there, so the encoder sees the optimised tokens exactly as it would see a
textual-inversion embedding, on every encoder a model has (SDXL: both)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ..spm_core.surrogates import Prompt

TEMPLATE = "a"  # the free tokens follow its first word, as in "a <embedding>"


def _token_table(clip, key: str) -> torch.Tensor:
    encoder = getattr(clip.cond_stage_model, f"clip_{key}")
    return encoder.transformer.get_input_embeddings().weight


def _content_ids(clip, text: str, key: str) -> list[int]:
    """The token ids of `text` for encoder `key`, without start, end and padding tokens."""
    row = clip.tokenize(text)[key][0]
    tokenizer = getattr(clip.tokenizer, f"clip_{key}")
    special = {tokenizer.start_token, tokenizer.end_token, getattr(tokenizer, "pad_token", None)}
    return [int(token) for token, *_ in row if int(token) not in special]


@contextlib.contextmanager
def _differentiable() -> Iterator[None]:
    """ComfyUI's CLIP layers add their residuals in place, which overwrites tensors autograd saved
    for backward. A copy of each saved tensor, taken when it is saved, keeps the graph valid (a text
    encoder's activations are small)."""
    with torch.autograd.graph.saved_tensors_hooks(lambda saved: saved.clone(), lambda saved: saved):
        yield


class ClipSoftPrompts:
    """"a <free tokens>" for a ComfyUI CLIP. A search starts from the words of the concept it attacks
    (every second search) or from random vocabulary tokens, so the bank holds both the concept's
    near-synonyms and prompts far from its words."""

    def __init__(self, clip, concept_texts: Sequence[str]) -> None:
        self.clip = clip
        self.template = clip.tokenize(TEMPLATE)
        self.keys = sorted(self.template)
        self.concept_ids = [{key: _content_ids(clip, text, key) for key in self.keys} for text in concept_texts]
        tables = [_token_table(clip, key) for key in self.keys]
        self.vocabulary = [table.shape[0] for table in tables]
        self.token_scale = float(sum(float(table.float().std()) for table in tables) / len(tables))
        self._searches = 0

    def initial(self, concept_index: int, count: int, generator: torch.Generator) -> list[torch.Tensor]:
        from_concept = self._searches % 2 == 0
        self._searches += 1
        tokens = []
        for key, size in zip(self.keys, self.vocabulary):
            words = self.concept_ids[concept_index][key]
            if from_concept and words:
                ids = [words[i % len(words)] for i in range(count)]
            else:
                ids = torch.randint(size, (count,), generator=generator).tolist()
            with torch.no_grad():
                tokens.append(_token_table(self.clip, key)[torch.tensor(ids)].float().clone())
        return tokens

    def encode(self, tokens: Sequence[torch.Tensor]) -> Prompt:
        batch = {}
        for key, free in zip(self.keys, tokens):
            row = list(self.template[key][0])
            # after the start token and the template's word; the row keeps its length (padding drops off)
            batch[key] = [row[:2] + [(vector, 1.0) for vector in free] + row[2:len(row) - free.shape[0]]]
        with _differentiable():
            embedding, pooled = self.clip.encode_from_tokens(batch, return_pooled=True)
        return Prompt(embedding[0].float().cpu(), None if pooled is None else pooled[0].float().cpu())
