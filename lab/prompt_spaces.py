"""Where an attack's free tokens go in each miniature world: the token table they live in, how a
prompt is laid out around them, and what the sampler is given for it.

  ClipPrompts  the UNet world: SD1 CLIP, 77 tokens, the start token first, the end token repeated as
               padding; the conditioning is CLIP's last hidden state.
  T5Prompts    the DiT world (a tiny Flux): T5, no start token, the end token then padding to the
               window; the conditioning is T5's last hidden state with CLIP-L's pooled vector of the
               prompt's words around the free tokens (Flux reads both; the attack moves T5's part,
               the text stream every Flux membrane binds to).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Frame:
    """The token embeddings around the free tokens: `head` (1, H, D), the start token if any and
    the words before; `tail` (1, window - H, D), the words after, the end token and the padding;
    `pooled`: the pooled vector the prompt carries beside them (None: the model reads none).
    ComfyUI's tokenizer lays out "before embedding:x after" the same way."""

    head: torch.Tensor
    tail: torch.Tensor
    content: int  # tokens of the prompt before its padding, free ones excluded
    pooled: torch.Tensor | None = None

    def embed(self, soft: torch.Tensor) -> torch.Tensor:
        """(1, window, D) token embeddings with `soft` (tokens, D) between the head and the tail."""
        length = self.head.shape[1] + self.tail.shape[1]
        if self.content + soft.shape[0] > length:
            raise ValueError(f"{soft.shape[0]} free tokens do not fit in one {length}-token prompt with its words")
        return torch.cat([self.head, soft[None].to(self.head), self.tail], dim=1)[:, :length]


class ClipPrompts:
    def __init__(self, clip) -> None:
        from miniworld import model

        self.clip, self.world = clip, model
        self.tokenizer = clip.tokenizer.clip_l
        self.table = model.text_transformer(clip).text_model.embeddings.token_embedding

    def content_ids(self, text: str) -> list[int]:
        """The token ids of `text`'s words (no start, end or padding)."""
        ids = self.world.token_ids(self.clip, text)
        return ids[1: ids.index(self.tokenizer.end_token)]

    def frame(self, before: str, after: str) -> Frame:
        head_ids = [self.tokenizer.start_token] + self.content_ids(before)
        tail_ids = self.content_ids(after)
        padding = [self.tokenizer.end_token] * (77 - len(head_ids) - len(tail_ids))
        with torch.no_grad():
            head = self.table(torch.tensor([head_ids])).float()
            tail = self.table(torch.tensor([tail_ids + padding])).float()
        return Frame(head, tail, len(head_ids) + len(tail_ids) + 1)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.world.encode_token_embeddings(self.clip, tokens)

    def piece(self, token: int) -> str:
        return self.tokenizer.inv_vocab[token].replace("</w>", "")


class T5Prompts:
    def __init__(self, clip) -> None:
        from miniworld import dit

        self.clip, self.world = clip, dit
        self.tokenizer = clip.tokenizer.t5xxl
        self.table = dit.t5(clip).shared

    def content_ids(self, text: str) -> list[int]:
        ids = self.world.token_ids(self.clip, text)[0]
        return ids[: ids.index(self.tokenizer.end_token)]

    def frame(self, before: str, after: str) -> Frame:
        head_ids, tail_ids = self.content_ids(before), self.content_ids(after)
        window = self.tokenizer.min_length
        padding = [self.tokenizer.pad_token] * (window - len(head_ids) - len(tail_ids) - 1)
        words = " ".join(part for part in (before, after) if part)
        with torch.no_grad():
            head = self.table(torch.tensor([head_ids], dtype=torch.long), out_dtype=torch.float32)
            tail = self.table(torch.tensor([tail_ids + [self.tokenizer.end_token] + padding]), out_dtype=torch.float32)
            pooled = self.world.pooled_clip(self.clip, torch.tensor([self.world.token_ids(self.clip, words)[1]]))
        return Frame(head, tail, len(head_ids) + len(tail_ids) + 1, pooled.float())

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.world.encode_t5_embeddings(self.clip, tokens)

    def piece(self, token: int) -> str:
        return self.tokenizer.inv_vocab[token].replace("▁", "")


def prompt_space(clip) -> ClipPrompts | T5Prompts:
    """The prompt space of a miniature world's CLIP (Flux's text encoders hold a T5)."""
    return T5Prompts(clip) if hasattr(clip.tokenizer, "t5xxl") else ClipPrompts(clip)
