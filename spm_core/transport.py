"""Facilitated Transport: how far each membrane opens for a given prompt.

Paper formula, for prompt p and a membrane's concepts c_i:

    gamma = max_i max( cos(flat(E_p), flat(E_ci)),  |tok(p) ∩ tok(ci)| / |tok(ci)| )

E is the text encoder's (77 x D) output, flattened; tok() are token ids without special tokens.
Modes, selectable by name:
  paper       the formula above; cosine alone where the prompt's token ids are unknown
  cosine      the flattened cosine only
  calibrated  cosine after subtracting the empty prompt's embedding (which removes what all
              prompts share: BOS and padding positions), mapped linearly from `threshold` (gate 0)
              to `saturation` (gate 1), then max with token overlap; unrelated prompts get exactly 0
  latent      the calibrated gate or, when higher, a gate from what the model is about to draw: at
              the first model call of a sampling run the bare model samples each prompt on its own
              for LATENT_LOOKAHEAD_STEPS Euler steps (CFG LATENT_LOOKAHEAD_CFG against the empty
              prompt, `look_ahead`); there its prediction for the prompt minus its prediction for the
              empty prompt is compared (cosine, over the whole latent) with the same difference for
              each concept at the same latent, and mapped linearly from `latent_threshold` (gate 0)
              to `latent_saturation` (gate 1). A prompt that draws the concept in words or
              embeddings the text gate does not match still opens the membrane. Without the
              look-ahead, at the first step every picture is still a blob of colour: a green
              object and a tree are the same green blob, and the tree membrane opened fully on
              every prompt asking for green. Costs 2 x LATENT_LOOKAHEAD_STEPS + concepts + 2 extra
              model rows per prompt and run.
  guarded     latent, and a second look-ahead with the membranes that open at all fully open: where
              the concept still forms (a prompt optimised to go around the membrane draws it through
              the open membrane), the prompt's conditioning is moved, by the breach
              (`breach_threshold` to `breach_saturation` on the same cosine, at most the gate),
              towards the concept's own words, and the row meets its membrane fully open, which
              erases those words. Costs as much again as the latent gate for prompts that open a
              membrane; nothing more for the others.
  tokens      for encoders with no whole-prompt embedding to compare (T5 in Flux): how well the
              prompt's token vectors match each of the concept's content-token vectors, measured
              from the empty prompt's match (spm_core.token_gate), mapped linearly from
              `token_threshold` (gate 0) to `token_saturation` (gate 1), then max with token
              overlap. Needs each concept's content-token positions (ConceptEmbedding.content)
  official_code  the paper gate applied as the official inference code applies it: one gate per
              prompt for the whole CFG batch (the negative row too), gate² for one membrane and
              the merged adapter of a whole chain (spm_core.membrane.GateLaw.OFFICIAL_MERGE), to
              reproduce its outputs; not our default, which gates each row by its own prompt
  always_open gate 1 for every row (what a plain LoRA loader does)
Every mode except always_open takes a `floor`: the least a membrane ever opens (for concepts that
must never pass whatever the prompt says; 0 = the formula alone).
Prompts longer than one 77-token chunk are compared chunk by chunk; the best chunk counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .choice import Choice
from .errors import SPMError
from .token_gate import TokenBank, content_vectors

# The latent gate's operating point, by one rule on the miniature world's calibration captions
# (docs/benchmark.md): the cosine below which 95% of captions that do not ask for a concept fall, and
# the median cosine of captions that do, both after the look-ahead (at the first step, without it,
# the rule gave 0.44 / 0.70 and 3.6% of captions opened a membrane they do not ask for; after it 1.5%).
LATENT_THRESHOLD, LATENT_SATURATION = 0.08, 0.65
LATENT_LOOKAHEAD_STEPS, LATENT_LOOKAHEAD_CFG = 4, 5.0  # of a 20-step schedule: the shapes have formed
# The guarded gate's breach ramp, by a rule fixed before any attack was measured against it
# (docs/benchmark.md): the threshold is the 99th percentile of the open membrane's cosine over
# captions that do not name its concept (a breach replaces the prompt, so almost none of those may
# trigger it), the saturation the median bare cosine of captions that do (what drawing the concept
# looks like, LATENT_SATURATION's rule); averaged over the ten default miniature membranes.
BREACH_THRESHOLD, BREACH_SATURATION = 0.20, 0.65
# The calibrated text gate's ramp by the same rule on the same captions (it was 0.3 / 0.7, never
# calibrated, and left four to nine of ten membranes a third to half open on every shape prompt).
CALIBRATED_THRESHOLD, CALIBRATED_SATURATION = 0.50, 0.67
# The token gate's operating point: a starting point, not a calibration. On the tiny random text
# encoders of tests/test_flux.py, prompts holding the concept's words score 1.0 (Flux's T5 padded to
# 256 tokens) or 0.49-1.0 (Chroma's unpadded T5: context moves a word's vectors more) and unrelated
# prompts 0-0.46; no real T5 weights exist offline to measure it on.
TOKEN_THRESHOLD, TOKEN_SATURATION = 0.5, 0.8


class TransportMode(Choice):
    PAPER = "paper", ("the paper's formula: cosine of the flattened text embeddings, or token overlap for prompts "
                      "from SPM Text Encode")
    COSINE = "cosine", "the embedding cosine only"
    CALIBRATED = "calibrated", "cosine relative to the empty prompt; unrelated prompts get exactly 0"
    LATENT = "latent", ("calibrated, or higher when the model is about to draw the concept, whatever the words "
                        "(the bare model looks 4 steps ahead for each prompt before sampling starts)")
    GUARDED = "guarded", ("latent, and where the concept still forms with the membrane open (an optimised prompt "
                          "going around it), the prompt is replaced by the concept's own words, which the membrane "
                          "erases (a second look-ahead for prompts that open a membrane)")
    TOKENS = "tokens", ("the concept's tokens found in order among the prompt's own token vectors (for T5 text "
                        "encoders: Flux)")
    OFFICIAL = "official_code", ("what the official SPM scripts do (paper gate, squared, one gate for the whole batch, "
                                 "a chain merged into one adapter), to reproduce them; set it on every membrane of a chain")
    ALWAYS_OPEN = "always_open", "gate 1 for every prompt, like a plain LoRA"


LOOKING_AHEAD = (TransportMode.LATENT, TransportMode.GUARDED)  # the modes whose gate asks the bare model


@dataclass(frozen=True)
class ConceptEmbedding:
    """A concept prompt as the text encoder sees it: (L, D) output, its content token ids and its
    pooled vector (P,), which models conditioned on a pooled vector (SDXL) also read."""

    embedding: torch.Tensor
    token_ids: frozenset[int] | None = None
    pooled: torch.Tensor | None = None
    content: tuple[int, int] | None = None  # (start, stop): the positions of its content tokens in `embedding`


def content_tokens(token_ids: Iterable[int], special_ids: Iterable[int]) -> frozenset[int]:
    """Token ids with BOS/EOS/padding removed."""
    special = set(special_ids)
    return frozenset(int(t) for t in token_ids if int(t) not in special)


def token_overlap(prompt_tokens: frozenset[int], concept_tokens: frozenset[int]) -> float:
    """|tok(p) ∩ tok(c)| / |tok(c)|; 0 for a concept with no content tokens."""
    if not concept_tokens:
        return 0.0
    return len(prompt_tokens & concept_tokens) / len(concept_tokens)


def chunked_flat_cosine(rows: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """Cosine of flattened embeddings: rows (B, N, D) against concepts (C, L, D) -> (B, C).
    N is cut into L-token chunks (the last one zero-padded) and the best chunk counts."""
    if concepts.shape[2] != rows.shape[2]:
        raise SPMError(f"prompt embeddings are {rows.shape[2]} wide but the concept embeddings {concepts.shape[2]}: "
                       "they were encoded with a different text encoder")
    flat_concepts = F.normalize(concepts.float().reshape(concepts.shape[0], -1), dim=-1)
    return _cosine_to_flat(rows, flat_concepts, concepts.shape[1])


def _cosine_to_flat(rows: torch.Tensor, flat_concepts: torch.Tensor, length: int) -> torch.Tensor:
    """`chunked_flat_cosine` against concepts already flattened and normalised to (C, L*D)."""
    batch, tokens, width = rows.shape
    if flat_concepts.shape[1] != length * width:
        raise SPMError(f"prompt embeddings are {width} wide but the concept embeddings "
                       f"{flat_concepts.shape[1] // length}: they were encoded with a different text encoder")
    chunks = -(-tokens // length)
    padded = F.pad(rows.float(), (0, 0, 0, chunks * length - tokens))
    flat_rows = F.normalize(padded.reshape(batch, chunks, length * width), dim=-1)
    return (flat_rows @ flat_concepts.t()).amax(dim=1)


def latent_cosines(prompt_shifts: torch.Tensor, concept_shifts: torch.Tensor) -> torch.Tensor:
    """(P, C) cosines between flattened prediction shifts (see Transport.latent_gates)."""
    prompts = F.normalize(prompt_shifts.float().reshape(prompt_shifts.shape[0], -1), dim=-1)
    concepts = F.normalize(concept_shifts.float().reshape(concept_shifts.shape[0], -1), dim=-1)
    return prompts @ concepts.t()


def look_ahead(denoise: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor], x: torch.Tensor,
               sigmas: Sequence[torch.Tensor]) -> torch.Tensor:
    """x (P, ...) after len(sigmas) - 1 Euler steps of CFG sampling, LATENT_LOOKAHEAD_CFG against the empty
    prompt: `denoise(x, sigma, conditional)` is the bare model's denoised prediction for each row's prompt
    (conditional) or for the empty prompt, as a sampler steps from sigmas[i] to sigmas[i + 1]."""
    for sigma, following in zip(sigmas[:-1], sigmas[1:]):
        unconditional = denoise(x, sigma, False).float()
        denoised = unconditional + LATENT_LOOKAHEAD_CFG * (denoise(x, sigma, True).float() - unconditional)
        x = x + (x - denoised) / sigma * (following - sigma)
    return x


def _ramp(similarity: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return ((similarity - low) / (high - low)).clamp(0.0, 1.0)


class Transport:
    """Computes the (rows x membranes) gate matrix from the rows' conditioning.

    `membranes` lists, per membrane, the embeddings of its concept prompts (all encoded with the
    text encoder that will encode the prompts). `empty` is the empty prompt's embedding, needed by
    the calibrated mode; `empty_pooled` its pooled vector, which the latent mode gives the model
    with the empty prompt where the model reads one (as each concept's own `pooled`).
    """

    def __init__(self, membranes: Sequence[Sequence[ConceptEmbedding]], mode: TransportMode,
                 empty: torch.Tensor | None = None, threshold: float = CALIBRATED_THRESHOLD,
                 saturation: float = CALIBRATED_SATURATION,
                 latent_threshold: float = LATENT_THRESHOLD, latent_saturation: float = LATENT_SATURATION,
                 floor: float = 0.0, empty_pooled: torch.Tensor | None = None,
                 token_threshold: float = TOKEN_THRESHOLD, token_saturation: float = TOKEN_SATURATION,
                 breach_threshold: float = BREACH_THRESHOLD, breach_saturation: float = BREACH_SATURATION) -> None:
        self.mode = mode
        self.membrane_count = len(membranes)
        if mode is TransportMode.ALWAYS_OPEN:
            return
        if not 0.0 <= floor <= 1.0:
            raise SPMError(f"the minimum gate must lie in [0, 1], got {floor}")
        self.floor = floor
        if any(len(concepts) == 0 for concepts in membranes):
            raise SPMError("a membrane has no concepts, so its gate cannot be computed; use transport mode "
                           "'always_open' or give it concepts")
        if mode in (TransportMode.CALIBRATED, *LOOKING_AHEAD, TransportMode.TOKENS):
            if empty is None:
                raise SPMError(f"{mode.value} transport needs the empty prompt's embedding")
            for low, high in ((threshold, saturation), (latent_threshold, latent_saturation),
                              (token_threshold, token_saturation), (breach_threshold, breach_saturation)):
                if not -1.0 <= low < high <= 1.0:
                    raise SPMError(f"{mode.value} transport needs threshold < saturation within [-1, 1], got {low}, {high}")
        self.threshold, self.saturation = threshold, saturation
        self.latent_threshold, self.latent_saturation = latent_threshold, latent_saturation
        self.token_threshold, self.token_saturation = token_threshold, token_saturation
        self.breach_threshold, self.breach_saturation = breach_threshold, breach_saturation
        flat = [c for concepts in membranes for c in concepts]
        if mode is TransportMode.TOKENS:  # encoders that do not pad (Chroma's T5) give concepts their own lengths
            flat = _padded_to_longest(flat)
        self.concept_owner = torch.tensor([m for m, concepts in enumerate(membranes) for _ in concepts])
        if len({tuple(c.embedding.shape) for c in flat}) > 1:
            raise SPMError("concept embeddings differ in length: every concept prompt must fit in one text-encoder "
                           "chunk (75 CLIP tokens)")
        embeddings = torch.stack([c.embedding.float() for c in flat])
        self.empty = None if empty is None else empty.float()
        self.concept_embeddings = embeddings  # the rows the latent gate asks the model about
        pooled = [c.pooled for c in flat]
        self.concept_pooled = None if empty_pooled is None or any(p is None for p in pooled) else torch.stack(
            [p.float().reshape(-1) for p in pooled])
        self.empty_pooled = None if self.concept_pooled is None else empty_pooled.float().reshape(-1)
        relative = mode in (TransportMode.CALIBRATED, *LOOKING_AHEAD)
        concepts = embeddings - self.empty if relative else embeddings
        # flattened and normalised once: per call only the rows are (a 50-concept bank is ~12 MB)
        self.length = concepts.shape[1]
        self.flat_concepts = F.normalize(concepts.reshape(concepts.shape[0], -1), dim=-1)
        self.concept_tokens = [c.token_ids for c in flat]
        self.token_bank = _token_bank(flat, self.empty) if mode is TransportMode.TOKENS else None

    def gates(self, rows: torch.Tensor, row_tokens: Sequence[frozenset[int] | None] | None = None) -> torch.Tensor:
        """rows: (B, N, D) conditioning; row_tokens: content token ids per row, None where unknown."""
        batch = rows.shape[0]
        if self.mode is TransportMode.ALWAYS_OPEN:
            return torch.ones(batch, self.membrane_count)
        if self.token_bank is not None:
            similarity = _ramp(self.token_bank.relative(rows), self.token_threshold, self.token_saturation)
            if row_tokens is not None:
                similarity = torch.maximum(similarity, self._overlaps(row_tokens, batch))
            return self._per_membrane(similarity).clamp(min=self.floor)
        relative = self.mode in (TransportMode.CALIBRATED, *LOOKING_AHEAD)
        if relative:
            chunks = -(-rows.shape[1] // self.empty.shape[0])
            rows = rows.float() - self.empty.to(rows.device).repeat(chunks, 1)[: rows.shape[1]]
        if self.flat_concepts.device != rows.device:
            self.flat_concepts = self.flat_concepts.to(rows.device)
        similarity = _cosine_to_flat(rows, self.flat_concepts, self.length).cpu()
        if relative:
            similarity = _ramp(similarity, self.threshold, self.saturation)
        if self.mode is not TransportMode.COSINE and row_tokens is not None:
            similarity = torch.maximum(similarity, self._overlaps(row_tokens, batch))
        return self._per_membrane(similarity.clamp(0.0, 1.0)).clamp(min=self.floor)

    @property
    def text_width(self) -> int | None:
        """The width of the text-encoder output the concepts were encoded with; None for always_open."""
        return None if self.mode is TransportMode.ALWAYS_OPEN else self.concept_embeddings.shape[2]

    @property
    def reads_model(self) -> bool:
        """Whether the gate also needs the model's predictions (see `latent_gates`)."""
        return self.mode in LOOKING_AHEAD

    @property
    def guards(self) -> bool:
        """Whether a breach (the concept forming with the membrane open) replaces the prompt (see `breaches`)."""
        return self.mode is TransportMode.GUARDED

    def latent_gates(self, prompt_shifts: torch.Tensor, concept_shifts: torch.Tensor) -> torch.Tensor:
        """(P, membranes) latent gates. prompt_shifts: (P, ...) the bare model's prediction for each
        prompt minus its prediction for the empty prompt; concept_shifts: (C, ...) the same for
        each concept in `concept_embeddings` order, at the same noisy latent."""
        cosines = latent_cosines(prompt_shifts, concept_shifts)
        return self._per_membrane(_ramp(cosines, self.latent_threshold, self.latent_saturation)).clamp(min=self.floor)

    def breaches(self, open_shifts: torch.Tensor, concept_shifts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, membranes) breaches and, per membrane, the index (P, membranes) in `concept_embeddings` of
        the concept that breached most. open_shifts: (P, ...) the model's prediction for each prompt
        with the membranes open minus the bare model's for the empty prompt, after a look-ahead with
        the membranes open; concept_shifts: (C, ...) the bare model's shift for each concept there."""
        breach = _ramp(latent_cosines(open_shifts, concept_shifts), self.breach_threshold, self.breach_saturation).cpu()
        membranes = self._per_membrane(breach)
        owned = torch.where(self.concept_owner[None, :, None] == torch.arange(self.membrane_count)[None, None, :],
                            breach[:, :, None], torch.tensor(-1.0))
        return membranes, owned.argmax(dim=1)

    def _per_membrane(self, per_concept: torch.Tensor) -> torch.Tensor:
        """(B, concepts) -> (B, membranes): a membrane opens as far as its closest concept."""
        batch = per_concept.shape[0]
        gates = torch.zeros(batch, self.membrane_count)
        owner = self.concept_owner.expand(batch, -1)
        return gates.scatter_reduce(1, owner, per_concept.cpu(), reduce="amax", include_self=True)

    def _overlaps(self, row_tokens: Sequence[frozenset[int] | None], batch: int) -> torch.Tensor:
        if len(row_tokens) != batch:
            raise SPMError(f"token ids given for {len(row_tokens)} rows, embeddings for {batch}")
        return torch.tensor([[0.0 if tokens is None or concept is None else token_overlap(tokens, concept)
                              for concept in self.concept_tokens] for tokens in row_tokens])


def _padded_to_longest(concepts: Sequence[ConceptEmbedding]) -> list[ConceptEmbedding]:
    """Concept embeddings zero-padded to the longest one's length: the token gate reads only each
    concept's content positions."""
    longest = max(c.embedding.shape[0] for c in concepts)
    return [dataclasses.replace(c, embedding=F.pad(c.embedding, (0, 0, 0, longest - c.embedding.shape[0])))
            for c in concepts]


def _token_bank(concepts: Sequence[ConceptEmbedding], empty: torch.Tensor) -> TokenBank:
    if any(c.content is None for c in concepts):
        raise SPMError("tokens transport needs the positions of each concept's content tokens in its encoding "
                       "(ConceptEmbedding.content)")
    return TokenBank([content_vectors(c.embedding, c.content) for c in concepts], empty)
