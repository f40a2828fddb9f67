"""How a chain of membranes is gated on each row of each model call: which membranes act on a row
(its cond's role, read from the guider, and the rows setting), how far each opens (its transport's
gate from the row's own prompt, per batch item; for latent transport also the bare model's answer,
measured once per cond and sampling run) and at what strength (the sampling schedule). The
ComfyUI wiring that feeds it lives in nodes/runtime.py.

Roles: a guider's "negative" and "empty_negative_prompt" conds are negative rows; every other
named cond (positive, DualCFG's middle, ...) and any cond no guider named is a positive row, gated
by its own conditioning.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..spm_core.choice import Choice
from ..spm_core.errors import SPMError
from ..spm_core.membrane import GateLaw, Membrane
from ..spm_core.ramp import Ramp, SamplingSchedule
from ..spm_core.stack import InstalledHooks, MembraneStack, MembraneUse
from ..spm_core.transport import Transport, TransportMode, look_ahead
from .architectures import text_stream_blocks
from .encode import TOKENS_KEY, TOKENS_OF_KEY, embedding_fingerprint

MAX_STRENGTH = 100.0  # also the SPM Load Membrane widgets' limits
GATE_CACHE_SIZE = 512
POSITIVE, NEGATIVE = "positive", "negative"
NEGATIVE_COND_NAMES = frozenset({"negative", "empty_negative_prompt"})  # guider names of negative-role conds


class Rows(Choice):
    """Which CFG rows a membrane acts on."""

    POSITIVE_ONLY = "positive only", "the positive prompt's rows (the paper); negative rows stay closed"
    NEGATIVE_ONLY = "negative only", "the negative prompt's rows alone, gated by the negative prompt, at negative_strength"
    POSITIVE_AND_NEGATIVE = "positive and negative", "both, each row gated by its own prompt"


@dataclass(frozen=True)
class MembraneEntry:
    """One SPM Load Membrane node's contribution: a membrane and how it is gated."""

    membrane: Membrane
    strength: float
    transport: Transport
    rows: Rows = Rows.POSITIVE_ONLY
    start_percent: float = 0.0
    end_percent: float = 1.0
    node_id: str | None = None
    negative_strength: float | None = None  # on negative rows; None: the same as `strength`
    ramp: Ramp = Ramp.CONSTANT

    def __post_init__(self) -> None:
        """Everything that can be wrong with an entry is refused here, before any MODEL is cloned."""
        if not isinstance(self.rows, Rows):
            raise SPMError(f"rows is {self.rows!r}; choose one of {', '.join(repr(r.value) for r in Rows)}")
        for name, value in (("strength", self.strength), ("negative_strength", self.negative_strength)):
            if value is not None and not (math.isfinite(value) and abs(value) <= MAX_STRENGTH):
                raise SPMError(f"{name} is {value}; give a number between -{MAX_STRENGTH:g} and {MAX_STRENGTH:g} "
                               "(1.0 = as trained, 0 = off)")
        official = self.transport.mode is TransportMode.OFFICIAL
        if official and self.rows is Rows.NEGATIVE_ONLY:
            raise SPMError(f"transport 'official_code' with rows {Rows.NEGATIVE_ONLY.value!r} would never act: the official "
                           "scripts gate every row by the positive prompt, so a membrane kept off the positive rows stays "
                           "closed on all of them (negative_strength is not used either). Set rows to "
                           f"{Rows.POSITIVE_ONLY.value!r} to reproduce the official scripts, or choose another transport to "
                           "act on negative rows only")
        if official and self.ramp is not Ramp.CONSTANT:
            raise SPMError("transport 'official_code' reproduces the official scripts, which have one strength for the "
                           "whole run: set ramp to 'constant'")
        SamplingSchedule([(self.start_percent, self.end_percent, self.ramp)])  # refuses an invalid range

    def acts_on(self, role: str) -> bool:
        if self.rows is Rows.POSITIVE_AND_NEGATIVE:
            return True
        return self.rows is (Rows.NEGATIVE_ONLY if role == NEGATIVE else Rows.POSITIVE_ONLY)

    def strength_on(self, role: str) -> float:
        if role == NEGATIVE and self.negative_strength is not None:
            return self.negative_strength
        return self.strength

    @property
    def label(self) -> str:
        return f"{self.membrane.name} ({', '.join(self.membrane.concept_labels) or 'no concepts'})"


class Chunk(NamedTuple):
    """What a calc_cond_batch call's chunk is: its cond's role, its text gates (items, membranes) and
    the cond's identity (its uuid and its embedding: ComfyUI's area copies share a uuid)."""

    role: str
    gates: torch.Tensor | None
    cond: tuple


class MembraneState:
    """Everything one MODEL clone needs to apply its membranes. Immutable once built: chaining
    another membrane builds a new state for a new clone."""

    def __init__(self, entries: tuple[MembraneEntry, ...], key_map: dict[str, str],
                 shapes: dict[str, tuple[int, int, bool]]) -> None:
        self.entries = entries
        official = [e.transport.mode is TransportMode.OFFICIAL for e in entries]
        if any(official) and not all(official):
            named = ", ".join(f"node {e.node_id}: {e.membrane.name} ({e.transport.mode.value})" if e.node_id
                              else f"{e.membrane.name} ({e.transport.mode.value})" for e in entries)
            raise SPMError("transport 'official_code' reproduces the official code for a whole chain of membranes: "
                           f"set it on every SPM Load Membrane of the chain, or on none (this chain: {named})")
        self.official = all(official)
        gate_law = GateLaw.OFFICIAL_MERGE if self.official else GateLaw.LINEAR
        self.stack = MembraneStack([MembraneUse(e.membrane, e.strength) for e in entries], key_map, shapes, gate_law)
        self.hooks = InstalledHooks(self.stack)
        self._gates: OrderedDict[object, tuple[weakref.ref, torch.Tensor]] = OrderedDict()
        self._roles: OrderedDict[object, str] = OrderedDict()
        self._fingerprints: OrderedDict[int, tuple[weakref.ref, tuple]] = OrderedDict()
        # per role, (membranes,): which membranes act on such rows, and at what strength
        self._acting = {role: torch.tensor([e.acts_on(role) for e in entries], dtype=torch.float32) for role in (POSITIVE, NEGATIVE)}
        self._strengths = {role: torch.tensor([e.strength_on(role) for e in entries], dtype=torch.float32)
                           for role in (POSITIVE, NEGATIVE)}
        self.schedule = SamplingSchedule([(e.start_percent, e.end_percent, e.ramp) for e in entries])
        self._latent_entries = [i for i, e in enumerate(entries) if e.transport.reads_model]
        self._guarded_entries = [i for i, e in enumerate(entries) if e.transport.guards]
        # Chunk.cond -> (items, membranes), for the sampling run in progress
        self._latent_gates: dict[tuple, torch.Tensor] = {}
        # Chunk.cond -> ((items, membranes) breaches, (items, membranes) concept index), guarded membranes only
        self._breaches: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._official_gate: torch.Tensor | None = None  # official_code: the guider's first positive prompt's
        self.last_gates: dict[str, list[float]] = {}
        self._call = threading.local()  # the chunk table of the calc_cond_batch call in progress (ComfyUI may run batches in threads)

    def on_model_patcher_clone(self) -> MembraneState:
        return self  # clones of this MODEL (made by samplers or other packs) share its membranes

    def install_hooks(self, base_model) -> None:
        """The stack's hooks on `base_model`'s modules (see InstalledHooks.install); idempotent."""
        self.hooks.install({key: base_model.get_submodule(key) for key in self.stack.layers}, text_stream_blocks(base_model))

    # --- gates
    def gates_for(self, embedding: torch.Tensor, token_ids: frozenset[int] | None) -> torch.Tensor:
        """(items, membranes) gates for a conditioning's items: embedding (items, N, D), each item
        gated by itself; `token_ids` (the prompt's, when recorded) count for every item."""
        tokens = None if token_ids is None else [token_ids] * embedding.shape[0]
        return torch.cat([entry.transport.gates(embedding, tokens) for entry in self.entries], dim=1)

    def cond_gates(self, cond: dict, tokens_by_embedding: dict) -> torch.Tensor | None:
        """(items, membranes) gates for one cond dict, one row per prompt it carries (batch-prompt
        nodes give one per batch item), from its own embedding and the token ids recorded for that
        embedding, if any; cached; None when it carries no cross-attention."""
        embedding = _embedding_of(cond)
        if embedding is None:
            return None
        key = (cond.get("uuid"), id(embedding))
        cached = self._gates.get(key)
        if cached is None or cached[0]() is not embedding:  # a dead reference: the id was reused
            cached = (weakref.ref(embedding), self.gates_for(embedding, tokens_by_embedding.get(self.fingerprint(embedding))))
            self._gates[key] = cached
            while len(self._gates) > GATE_CACHE_SIZE:
                self._gates.popitem(last=False)
        return cached[1]

    def fingerprint(self, embedding: torch.Tensor) -> tuple:
        """embedding_fingerprint, once per tensor: it reads values back from the device, and
        calc_cond_batch asks for it at every step."""
        cached = self._fingerprints.get(id(embedding))
        if cached is None or cached[0]() is not embedding:
            cached = (weakref.ref(embedding), embedding_fingerprint(embedding))
            self._fingerprints[id(embedding)] = cached
            while len(self._fingerprints) > GATE_CACHE_SIZE:
                self._fingerprints.popitem(last=False)
        return cached[1]

    def remember_roles(self, named_conds: dict) -> None:
        """Each cond's role from the name the guider gives it."""
        for name, conds in named_conds.items():
            role = NEGATIVE if name in NEGATIVE_COND_NAMES else POSITIVE
            for cond in conds or []:
                if cond.get("uuid") is not None:
                    self._roles[cond["uuid"]] = role
        while len(self._roles) > GATE_CACHE_SIZE:
            self._roles.popitem(last=False)

    def measured_latent_gates(self) -> list[torch.Tensor]:
        """(items, membranes) latent gates of each cond measured in the current or last sampling run."""
        return list(self._latent_gates.values())

    def measured_breaches(self) -> list[torch.Tensor]:
        """(items, membranes) breaches of each cond measured in the current or last sampling run."""
        return [breach for breach, _ in self._breaches.values()]

    @property
    def reads_model(self) -> bool:
        return bool(self._latent_entries)

    def begin_sampling(self, named_conds: dict) -> None:
        self.remember_roles(named_conds)
        self._latent_gates.clear()
        self._breaches.clear()
        self._official_gate = self._first_positive_gate(named_conds) if self.official else None

    def _first_positive_gate(self, named_conds: dict) -> torch.Tensor | None:
        """(membranes,) text gates of the guider's first positive prompt: official_code gates every row
        of a step by it, however ComfyUI splits the step's rows into model calls."""
        first = next((cond for cond in named_conds.get(POSITIVE) or [] if torch.is_tensor(cond.get("cross_attn"))), None)
        if first is None:
            return None
        embedding = first["cross_attn"]
        tokens = first.get(TOKENS_KEY) if first.get(TOKENS_OF_KEY) == self.fingerprint(embedding) else None
        return self.gates_for(embedding[:1].float().cpu(), tokens)[0]

    def measure_latent_gates(self, run_model, transformer_options: dict, rows: int, table: dict,
                             reference: torch.Tensor, sigmas: Sequence[torch.Tensor]) -> None:
        """Latent gates (and, for guarded membranes, breaches) for every chunk's cond not yet measured
        in this sampling run, one per prompt the cond carries; conds of a role no latent membrane acts
        on (negatives under "positive only") are not measured. `run_model`, `reference` and `sigmas` as
        in `latent_gates`, the sources being rows of the sampling call (`rows` of them); `table` the
        calc_cond_batch call's chunk_table."""
        uuids = transformer_options.get("uuids") or []
        indices = transformer_options.get("cond_or_uncond") or [None] * len(uuids)
        if not self.reads_model or not uuids:
            return
        per_chunk = rows // len(uuids)
        pending = {}
        for chunk, key in enumerate(zip(indices, uuids)):
            known = table.get(key) or Chunk(POSITIVE, None, key)
            if known.cond in self._latent_gates or known.cond in pending:
                continue
            items = 1 if known.gates is None else min(known.gates.shape[0], per_chunk)
            if not self._acting[known.role][self._latent_entries].any():
                self._latent_gates[known.cond] = torch.zeros(items, len(self.entries))
                continue
            pending[known.cond] = (known, [chunk * per_chunk + item for item in range(items)])
        if not pending:
            return
        sources = [row for _, chunk_rows in pending.values() for row in chunk_rows]
        gates = self.latent_gates(run_model, None, sources, reference, sigmas)
        opened = []
        for cond, (known, chunk_rows) in pending.items():
            self._latent_gates[cond], gates = gates[: len(chunk_rows)], gates[len(chunk_rows):]
            text = torch.zeros_like(self._latent_gates[cond]) if known.gates is None else known.gates[: len(chunk_rows)]
            # a negative prompt is never replaced: it is not what the picture draws
            opened.append(torch.maximum(self._latent_gates[cond], text) * self._acting[known.role] * (known.role == POSITIVE))
        if not self._guarded_entries:
            return
        breach, chosen = self.breaches(run_model, None, sources, reference, sigmas, torch.cat(opened))
        for cond, (_, chunk_rows) in pending.items():
            self._breaches[cond] = (breach[: len(chunk_rows)], chosen[: len(chunk_rows)])
            breach, chosen = breach[len(chunk_rows):], chosen[len(chunk_rows):]

    def call_breaches(self, context: torch.Tensor, transformer_options: dict, sigma: torch.Tensor, model_sampling,
                      table: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, membranes) breaches of a guider's batch at this step and the concept each breached
        with (see `breaches`), or None when no row is breached. A membrane the schedule keeps closed
        at this step breaches nothing: a row moved to the concept's words must meet its membrane."""
        if not self._breaches:  # every call of every latent-gated run passes here
            return None
        uuids = transformer_options.get("uuids") or []
        indices = transformer_options.get("cond_or_uncond") or [None] * len(uuids)
        found = [self._breaches.get((table.get(key) or Chunk(POSITIVE, None, key)).cond) for key in zip(indices, uuids)]
        if not any(entry is not None and bool(entry[0].any()) for entry in found):
            return None
        in_range = self.schedule.active(float(sigma.reshape(-1)[0]), model_sampling)
        per_chunk = context.shape[0] // len(uuids)
        nothing = (torch.zeros(1, len(self.entries)), torch.zeros(1, len(self.entries), dtype=torch.long))
        rows = [(_per_row(breach, per_chunk) * in_range, _per_row(chosen, per_chunk)) for breach, chosen in (f or nothing for f in found)]
        breach = torch.cat([breach for breach, _ in rows])
        return (breach, torch.cat([chosen for _, chosen in rows])) if bool(breach.any()) else None

    def latent_gates(self, run_model, contexts: torch.Tensor | None, sources: list[int], reference: torch.Tensor,
                     sigmas: Sequence[torch.Tensor]) -> torch.Tensor:
        """(P, membranes) latent gates (Transport.latent_gates) of P prompts; 0 for membranes gated by
        text alone. Each prompt is sampled by the bare model from `reference` (1, ...) over `sigmas`
        (spm_core.transport.look_ahead) and compared with the concepts at its own latent there.
        `run_model(contexts, sources, pooled, x, sigma, gates=None, strengths=None)` returns the
        model's denoised predictions for rows at latents `x` (R, ...) and `sigma`, with every membrane
        closed or at `gates` (R, membranes) and `strengths`, of conditioning `contexts` (R, N, D)
        (None: the sources' own) whose other inputs are those of the caller's rows `sources`, with
        `pooled` (R, P) as their pooled text vectors (None: the sources' own). The concepts and the
        empty prompt take each prompt's other inputs and their own pooled vectors."""
        x = look_ahead(self._look_ahead_model(run_model, contexts, sources), self._start(reference, sources), sigmas)
        prompt_shifts, concept_shifts = self._shifts_at(run_model, contexts, sources, x, sigmas[-1], self._latent_entries)
        columns = [torch.zeros(len(sources)) for _ in self.entries]
        for index, shifts in concept_shifts.items():
            columns[index] = torch.cat([self.entries[index].transport.latent_gates(prompt_shifts[p: p + 1], shifts[p])
                                        for p in range(len(sources))])[:, 0]
        return torch.stack(columns, dim=1)

    def breaches(self, run_model, contexts: torch.Tensor | None, sources: list[int], reference: torch.Tensor,
                 sigmas: Sequence[torch.Tensor], gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, membranes) breaches of the guarded membranes (Transport.breaches; 0 for the others) and
        (P, membranes) the index of the concept that breached each, for P prompts whose membranes open
        at `gates` (P, membranes): each prompt sampled from `reference` over `sigmas` with its
        membranes open at its gates (a guarded membrane that opens at all: fully) and the positive
        rows' strengths, then compared with the concepts as the bare model draws them there; a
        breach is at most its membrane's gate. `run_model` as in `latent_gates`. Prompts that open
        no guarded membrane are not sampled."""
        breach, chosen = torch.zeros(len(sources), len(self.entries)), torch.zeros(len(sources), len(self.entries), dtype=torch.long)
        opening = [p for p in range(len(sources)) if bool(gates[p, self._guarded_entries].gt(0).any())]
        if not opening:
            return breach, chosen
        rows = [sources[p] for p in opening]
        own = None if contexts is None else contexts[opening]
        # a guarded membrane that opens at all is looked at fully open, as its breach ramp was calibrated
        # and as a breached row meets it (`call_gates`)
        open_gates = gates[opening].float().clone()
        open_gates[:, self._guarded_entries] = open_gates[:, self._guarded_entries].gt(0).float()
        strengths = self._strengths[POSITIVE].expand(len(opening), -1)
        x = look_ahead(self._look_ahead_model(run_model, own, rows, open_gates, strengths), self._start(reference, rows), sigmas)
        open_shifts, concept_shifts = self._shifts_at(run_model, own, rows, x, sigmas[-1], self._guarded_entries,
                                                      open_gates, strengths)
        for index, shifts in concept_shifts.items():
            for row, p in enumerate(opening):
                found, concept = self.entries[index].transport.breaches(open_shifts[row: row + 1], shifts[row])
                # never further than the membrane opened: a prompt the gates barely open is not replaced
                breach[p, index], chosen[p, index] = torch.minimum(found[0, 0], gates[p, index].float()), concept[0, 0]
        return breach, chosen

    def _start(self, reference: torch.Tensor, sources: list[int]) -> torch.Tensor:
        return reference.float().expand(len(sources), *reference.shape[1:])

    def _empty_rows(self, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        transport = self.entries[self._latent_entries[0]].transport
        empty_pooled = None if transport.empty_pooled is None else transport.empty_pooled[None].expand(count, -1)
        return transport.empty[None].expand(count, -1, -1), empty_pooled

    def _look_ahead_model(self, run_model, contexts: torch.Tensor | None, sources: list[int], gates: torch.Tensor | None = None,
                          strengths: torch.Tensor | None = None):
        """`denoise` for spm_core.transport.look_ahead: the prompts with their membranes at `gates`
        (None: closed) against the bare model's empty prompt."""
        empty, empty_pooled = self._empty_rows(len(sources))

        def denoise(x: torch.Tensor, sigma: torch.Tensor, conditional: bool) -> torch.Tensor:
            if conditional:
                return run_model(contexts, sources, None, x, sigma, gates, strengths)
            return run_model(empty, sources, empty_pooled, x, sigma)

        return denoise

    def _shifts_at(self, run_model, contexts: torch.Tensor | None, sources: list[int], x: torch.Tensor, sigma: torch.Tensor,
                   entries: list[int], gates: torch.Tensor | None = None,
                   strengths: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """At each prompt's latent in `x`: its prediction (membranes at `gates`, or closed) minus the
        bare model's for the empty prompt (P, ...), and per entry of `entries` the bare model's same
        shift for each of its concepts (P, concepts, ...)."""
        transport = self.entries[self._latent_entries[0]].transport
        count = len(sources)
        concept_rows = torch.cat([transport.empty[None]] + [self.entries[i].transport.concept_embeddings for i in entries])
        pooled = [transport.empty_pooled] + [self.entries[i].transport.concept_pooled for i in entries]
        concept_pooled = None if any(p is None for p in pooled) else torch.cat([pooled[0][None], *pooled[1:]])
        per_prompt = concept_rows.shape[0]  # the empty prompt and every concept, at each prompt's latent
        concept_predictions = run_model(
            concept_rows.repeat(count, 1, 1), [source for source in sources for _ in range(per_prompt)],
            None if concept_pooled is None else concept_pooled.repeat(count, 1), x.repeat_interleave(per_prompt, 0),
            sigma).reshape(count, per_prompt, *x.shape[1:])
        empty_predictions = concept_predictions[:, :1]
        prompt_shifts = run_model(contexts, sources, None, x, sigma, gates, strengths) - empty_predictions[:, 0]
        concept_shifts, offset = {}, 1
        for index in entries:
            width = self.entries[index].transport.concept_embeddings.shape[0]
            concept_shifts[index] = concept_predictions[:, offset: offset + width] - empty_predictions
            offset += width
        return prompt_shifts, concept_shifts

    def guarded_inputs(self, context: torch.Tensor, pooled: torch.Tensor | None, breach: torch.Tensor,
                       chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`context` (rows, N, D) and `pooled` (rows, P) moved towards the words of the concepts that
        breached each row, by its largest breach (rows, membranes; `chosen` as `breaches` gives it):
        a fully breached row reads the concept's own prompt (every N-token chunk of it), which its
        membrane erases."""
        amount = breach.amax(dim=1).to(context)
        share = (breach / breach.sum(dim=1, keepdim=True).clamp(min=1e-12)).to(context)
        target = torch.zeros_like(context)
        target_pooled = None if pooled is None else torch.zeros_like(pooled)
        for index in self._guarded_entries:
            transport = self.entries[index].transport
            words = transport.concept_embeddings[chosen[:, index]].to(context)
            chunks = -(-context.shape[1] // words.shape[1])
            target = target + share[:, index, None, None] * words.repeat(1, chunks, 1)[:, : context.shape[1]]
            if target_pooled is not None and transport.concept_pooled is not None:
                target_pooled = target_pooled + share[:, index, None] * transport.concept_pooled[chosen[:, index]].to(pooled)
        # lerp is exact at both ends: an unbreached row keeps its own conditioning, a fully breached one reads the words
        blended = torch.lerp(context, target, amount[:, None, None])
        if target_pooled is None:
            return blended, pooled
        return blended, torch.lerp(pooled, target_pooled, amount[:, None].to(pooled))

    def chunk_table(self, cond_lists) -> dict[tuple[int, object], Chunk]:
        """A Chunk per (list index, uuid) for one calc_cond_batch call. ComfyUI's
        "cond_or_uncond" is a chunk's list index and a list's role is its first cond's (the guider
        named it); ComfyUI appends area copies of positive conds to the negative list *with the
        positive's uuid*, so a uuid alone does not say which cond a chunk is."""
        lists = [cond_list or [] for cond_list in cond_lists]
        # those copies also keep the positive's token ids: token ids count only for the embedding
        # they were recorded with, wherever that embedding turns up
        tokens_by_embedding = {cond[TOKENS_OF_KEY]: cond.get(TOKENS_KEY) for conds in lists for cond in conds
                               if TOKENS_OF_KEY in cond and _embedding_of(cond) is not None
                               and cond[TOKENS_OF_KEY] == self.fingerprint(_embedding_of(cond))}
        table = {}
        for index, conds in enumerate(lists):
            role = self._roles.get(conds[0].get("uuid"), POSITIVE) if conds else POSITIVE
            for cond in conds:
                embedding = _embedding_of(cond)
                table[(index, cond.get("uuid"))] = Chunk(role, self.cond_gates(cond, tokens_by_embedding),
                                                         (cond.get("uuid"), None if embedding is None else id(embedding)))
        return table

    @contextlib.contextmanager
    def calling(self, cond_lists: Sequence[list[dict] | None]) -> Iterator[None]:
        """Within this block (one calc_cond_batch call), `call_chunks` is the chunk table of `cond_lists`."""
        outer = getattr(self._call, "chunks", None)
        self._call.chunks = self.chunk_table(cond_lists)
        try:
            yield
        finally:
            self._call.chunks = outer

    def call_chunks(self) -> dict[tuple[int, object], Chunk]:
        """The chunk table of the calc_cond_batch call in progress on this thread, or {} outside one."""
        return getattr(self._call, "chunks", None) or {}

    def call_gates(self, context: torch.Tensor, transformer_options: dict, sigma: torch.Tensor,
                  model_sampling, table: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, membranes) gates for one batched model call, and the strengths of those rows;
        `table` the calc_cond_batch call's chunk_table (None for calls outside one)."""
        step_sigma = float(sigma.reshape(-1)[0])
        in_range = self.schedule.active(step_sigma, model_sampling)
        if transformer_options.get("uuids"):
            gates, strengths = self._chunk_gates(context, transformer_options, in_range, table or {})
        else:  # a call that bypassed the guider: each row gated by its own embedding, as a positive
            gates = self.gates_for(context, None) * in_range * self._acting[POSITIVE]
            self.last_gates[POSITIVE] = gates[-1].tolist()
            strengths = self._strengths[POSITIVE].expand(context.shape[0], -1)
        if self.official:
            return gates, self.stack.strengths.expand(context.shape[0], -1)
        if self.schedule.ramped:
            strengths = strengths * self.schedule.factors(step_sigma, model_sampling)
        return gates, strengths

    def _chunk_gates(self, context: torch.Tensor, transformer_options: dict, in_range: torch.Tensor,
                     table: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Gates and strengths of a guider's batch, each chunk by its cond's role."""
        uuids = transformer_options["uuids"]
        indices = transformer_options.get("cond_or_uncond") or [None] * len(uuids)
        per_chunk = context.shape[0] // len(uuids)
        gates, strengths, roles = [], [], []
        for chunk, key in enumerate(zip(indices, uuids)):
            role, item_gates, cond = table.get(key) or Chunk(POSITIVE, None, key)
            if item_gates is None:  # a path that skipped calc_cond_batch: gate from the embedding alone
                item_gates = self.gates_for(context[chunk * per_chunk: chunk * per_chunk + 1], None)
            gate = _per_row(item_gates, per_chunk)
            if cond in self._latent_gates:
                gate = torch.maximum(gate, _per_row(self._latent_gates[cond], per_chunk))
            if cond in self._breaches:  # a breached row's concept words meet their membrane fully open
                gate = torch.maximum(gate, _per_row(self._breaches[cond][0], per_chunk).gt(0).float())
            gate = gate * in_range * self._acting[role]
            self.last_gates[role] = gate[0].tolist()
            gates.append(gate)
            strengths.append(self._strengths[role].expand(per_chunk, -1))
            roles.append(role)
        if self.official:  # the official code: the first positive prompt's gate for every row of the step
            if self._official_gate is not None:
                shared = self._official_gate * in_range * self._acting[POSITIVE]
            else:  # sampled without a guider naming a positive prompt: the batch's first positive row
                shared = gates[roles.index(POSITIVE) if POSITIVE in roles else 0][0]
            gates = [shared.expand(per_chunk, -1)] * len(gates)
            self.last_gates = {role: shared.tolist() for role in set(roles)}
        return torch.cat(gates), torch.cat(strengths)


def _per_row(item_gates: torch.Tensor, rows: int) -> torch.Tensor:
    """(items, membranes) -> (rows, membranes) the way ComfyUI spreads a conditioning's items over a
    batch (comfy.utils.repeat_to_batch_size): row r carries item r mod items."""
    return item_gates[torch.arange(rows) % item_gates.shape[0]]


def _embedding_of(cond: dict) -> torch.Tensor | None:
    return getattr(cond.get("model_conds", {}).get("c_crossattn"), "cond", None)
