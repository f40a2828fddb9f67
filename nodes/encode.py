"""Text through the user's CLIP: concept embeddings for transport, and token ids on conditioning
(ComfyUI's CONDITIONING keeps neither the text nor its tokens)."""

from __future__ import annotations

import torch

from ..spm_core.errors import SPMError
from ..spm_core.membrane import Membrane
from ..spm_core.token_gate import case_variants
from ..spm_core.transport import LOOKING_AHEAD, ConceptEmbedding, Transport, TransportMode, content_tokens
from .architectures import content_span

TOKENS_KEY = "spm_token_ids"
TOKENS_OF_KEY = "spm_token_ids_embedding"  # fingerprint of the embedding the token ids belong to
CLIP_BOS, CLIP_EOS = 49406, 49407
WORD_BOUNDARY = "\u2581"  # SentencePiece's word-start mark, a token of its own before some words


def token_ids(clip, tokens: dict) -> frozenset[int]:
    """Content token ids of a tokenized prompt: the first encoder's ids without BOS/EOS/padding.
    SD1/SD2/SDXL encoders all use the CLIP BPE vocabulary, so any one of them tells the words."""
    key = "l" if "l" in tokens else next(iter(tokens))
    tokenizer = getattr(clip.tokenizer, f"clip_{key}", None)
    special = {getattr(tokenizer, name, None) for name in ("start_token", "end_token", "pad_token")} - {None}
    # T5's SentencePiece splits "a snowman" as "▁", "a", "▁snow", "man": the bare word-boundary piece
    # is in almost every prompt and names nothing
    pieces = getattr(tokenizer, "inv_vocab", {})
    ids = [token[0] for chunk in tokens[key] for token in chunk if isinstance(token[0], int)]
    special |= {token for token in ids if pieces.get(token) == WORD_BOUNDARY}
    return content_tokens(ids, special or {CLIP_BOS, CLIP_EOS})


CHUNK_TOKENS = 75  # content tokens in one CLIP chunk (77 with BOS and EOS)


def tokenize_one_chunk(clip, text: str, what: str) -> dict:
    """`clip.tokenize(text)`, refused with a message naming the field when the text needs more
    than one CLIP chunk: gates and training compare a concept's single (77-token) embedding."""
    tokens = clip.tokenize(text)
    key = "l" if "l" in tokens else next(iter(tokens))
    if len(tokens[key]) > 1:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise SPMError(f"the {what} {shown!r} is longer than one CLIP chunk ({CHUNK_TOKENS} tokens); a membrane's "
                       f"{what} must fit in {CHUNK_TOKENS} tokens: shorten it")
    return tokens


def encode_concept(clip, text: str) -> ConceptEmbedding:
    tokens = tokenize_one_chunk(clip, text, "concept prompt")
    embedding, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return ConceptEmbedding(embedding=embedding[0].float().cpu(), token_ids=token_ids(clip, tokens),
                            pooled=None if pooled is None else pooled[0].float().cpu(), content=content_span(clip, tokens))


def encode_empty(clip) -> torch.Tensor:
    return clip.encode_from_tokens(clip.tokenize(""))[0].float().cpu()


def embedding_fingerprint(embedding: torch.Tensor) -> tuple:
    """A few values and the shape of a conditioning tensor. Token ids are used only for the embedding
    they were recorded with: ComfyUI copies cond dicts onto other embeddings (area conds' negative
    copies, ConditioningConcat / Average), and those copies keep the first prompt's ids."""
    flat = embedding.detach().reshape(-1)
    return (tuple(embedding.shape[1:]), tuple(flat[:: max(1, flat.numel() // 16)][:16].float().cpu().tolist()))


def encode_with_tokens(clip, text: str) -> list:
    """What CLIPTextEncode returns, plus the prompt's content token ids on every entry."""
    tokens = clip.tokenize(text)
    ids = token_ids(clip, tokens)
    conditioning = clip.encode_from_tokens_scheduled(tokens)
    return [[embedding, {**options, TOKENS_KEY: ids, TOKENS_OF_KEY: embedding_fingerprint(embedding)}]
            for embedding, options in conditioning]


RELATIVE_MODES = (TransportMode.CALIBRATED, *LOOKING_AHEAD, TransportMode.TOKENS)  # compared with the empty prompt


def transport_for(clip, membrane: Membrane, mode: TransportMode, floor: float = 0.0) -> Transport:
    """The membrane's Transport: its concept prompts encoded with the user's CLIP (for the token gate in
    every case variant, T5 being case-sensitive) and, where the mode needs it, the empty prompt."""
    if mode is TransportMode.ALWAYS_OPEN:
        return Transport([[]], mode)
    spellings = case_variants if mode is TransportMode.TOKENS else (lambda prompt: (prompt,))
    concepts = [encode_concept(clip, spelling) for concept in membrane.concepts for prompt in concept.prompts
                for spelling in spellings(prompt)]
    empty = encode_concept(clip, "") if mode in RELATIVE_MODES else None
    return Transport([concepts], mode, empty=None if empty is None else empty.embedding,
                     empty_pooled=None if empty is None else empty.pooled, floor=floor)
