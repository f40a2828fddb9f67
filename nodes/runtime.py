"""How membranes ride on a ComfyUI MODEL: the one place that touches ModelPatcher.

An SPM Load Membrane node returns a clone that carries a `MembraneState` attachment (every membrane of the
chain, fused into one stack), an injection that installs the stack's forward hooks when ComfyUI
loads the model (and removes them when it unloads), and two keyed wrappers:
  CALC_COND_BATCH  computes each conditioning's gates once (by its uuid) from its embedding and,
                   when an SPM Text Encode made it, its token ids;
  APPLY_MODEL      assembles the per-row gate matrix for the batched call (chunks from
                   transformer_options["uuids"]; a cond carrying several prompts gates each batch item
                   by its own) and runs the model inside the stack's gate context; for latent
                   transport, the first call that meets a cond first asks the bare model about it and
                   about each concept (extra calls, membranes closed, no more rows per call than the
                   sampling call has, with the sampling call's patches, control and per-row inputs
                   but past the wrappers below ours: _pre_pass_options).
  OUTER_SAMPLE     learns each cond's role from the guider's named conds before sampling (by uuid:
                   ComfyUI's "cond_or_uncond" is a chunk's index in the guider's list, not a role)
                   and sends the gates that were used to the frontend when sampling ends.
Roles: a guider's "negative" and "empty_negative_prompt" conds are negative rows; every other
named cond (positive, DualCFG's middle, ...) and any cond no guider named is a positive row, gated
by its own conditioning.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple
from uuid import uuid4

import comfy.model_base
import numpy as np
import torch
from comfy.patcher_extension import PatcherInjection, WrappersMP

from ..spm_core.errors import SPMError
from ..spm_core.membrane import GateLaw, Membrane
from ..spm_core.ramp import Ramp
from ..spm_core.stack import InstalledHooks, MembraneStack, MembraneUse, gates_active
from ..spm_core.transport import Transport, TransportMode
from .architectures import membrane_layers
from .encode import TOKENS_KEY, TOKENS_OF_KEY, embedding_fingerprint

KEY = "spm_membranes"
POSITIVE_ONLY, NEGATIVE_ONLY, POSITIVE_AND_NEGATIVE = "positive only", "negative only", "positive and negative"
ROWS_CHOICES = (POSITIVE_ONLY, NEGATIVE_ONLY, POSITIVE_AND_NEGATIVE)
MAX_STRENGTH = 1e4
GATE_CACHE_SIZE = 512
POSITIVE, NEGATIVE = "positive", "negative"
NEGATIVE_COND_NAMES = frozenset({"negative", "empty_negative_prompt"})  # guider names of negative-role conds
# models whose vector input `y` starts with the prompt's pooled text vector (the rest: sizes, crops)
POOLED_FIRST_MODELS = (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner)
_call = threading.local()  # the chunk table of the calc_cond_batch call in progress (ComfyUI may run batches in threads)


@dataclass(frozen=True)
class MembraneEntry:
    """One SPM Load Membrane node's contribution: a membrane and how it is gated."""

    membrane: Membrane
    strength: float
    transport: Transport
    rows: str = POSITIVE_ONLY
    start_percent: float = 0.0
    end_percent: float = 1.0
    node_id: str | None = None
    negative_strength: float | None = None  # on negative rows; None: the same as `strength`
    ramp: Ramp = Ramp.CONSTANT

    def acts_on(self, role: str) -> bool:
        return self.rows == POSITIVE_AND_NEGATIVE or self.rows == (NEGATIVE_ONLY if role == NEGATIVE else POSITIVE_ONLY)

    def strength_on(self, role: str) -> float:
        if role == NEGATIVE and self.negative_strength is not None:
            return self.negative_strength
        return self.strength

    @property
    def label(self) -> str:
        return f"{self.membrane.name} ({', '.join(self.membrane.concept_labels) or 'no concepts'})"


def membrane_layers_of(model) -> tuple[dict[str, str], dict[str, tuple[int, int, bool]]]:
    """ComfyUI's own LoRA key map restricted to membrane layers (SD UNets, Flux: nodes.architectures),
    and those layers' shapes."""
    return membrane_layers(model)


class Chunk(NamedTuple):
    """What a calc_cond_batch call's chunk is: its cond's role, its text gates (items, membranes) and
    the cond's identity (its uuid and its embedding: ComfyUI's area copies share a uuid)."""

    role: str
    gates: torch.Tensor | None
    cond: tuple


class MembraneState:
    """Everything one MODEL clone needs to apply its membranes. Immutable once built: chaining
    another membrane builds a new state for a new clone."""

    def __init__(self, entries: tuple[MembraneEntry, ...], model) -> None:
        self.entries = entries
        official = [e.transport.mode is TransportMode.OFFICIAL for e in entries]
        if any(official) and not all(official):
            raise SPMError("transport 'official_code' reproduces the official code for a whole chain of membranes: "
                           "set it on every SPM Load Membrane of the chain, or on none")
        self.official = all(official)
        gate_law = GateLaw.OFFICIAL_MERGE if self.official else GateLaw.LINEAR
        key_map, shapes = membrane_layers_of(model)
        self.stack = MembraneStack([MembraneUse(e.membrane, e.strength) for e in entries], key_map, shapes, gate_law)
        self.hooks = InstalledHooks(self.stack)
        self._gates: OrderedDict[object, tuple[weakref.ref, torch.Tensor]] = OrderedDict()
        self._roles: OrderedDict[object, str] = OrderedDict()
        self._fingerprints: OrderedDict[int, tuple[weakref.ref, tuple]] = OrderedDict()
        # per role, (membranes,): which membranes act on such rows, and at what strength
        self._acting = {role: torch.tensor([e.acts_on(role) for e in entries], dtype=torch.float32) for role in (POSITIVE, NEGATIVE)}
        self._strengths = {role: torch.tensor([e.strength_on(role) for e in entries], dtype=torch.float32)
                           for role in (POSITIVE, NEGATIVE)}
        self._sigma_ranges: tuple[object, torch.Tensor, torch.Tensor] | None = None
        self._ramped = any(e.ramp is not Ramp.CONSTANT for e in entries)
        self._percent_table: tuple[object, list[float], list[float]] | None = None
        self._latent_entries = [i for i, e in enumerate(entries) if e.transport.reads_model]
        # Chunk.cond -> (items, membranes), for the sampling run in progress
        self._latent_gates: dict[tuple, torch.Tensor] = {}
        self._official_gate: torch.Tensor | None = None  # official_code: the guider's first positive prompt's
        self.last_gates: dict[str, list[float]] = {}

    def on_model_patcher_clone(self) -> MembraneState:
        return self  # clones of this MODEL (made by samplers or other packs) share its membranes

    # --- injection: forward hooks live exactly while ComfyUI has the model loaded
    def inject(self, patcher) -> None:
        self.hooks.install(self.modules_of(patcher.model))

    def eject(self, patcher) -> None:
        self.hooks.remove()

    def modules_of(self, base_model) -> dict[str, torch.nn.Module]:
        return {key: base_model.get_submodule(key) for key in self.stack.layers}

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

    @property
    def reads_model(self) -> bool:
        return bool(self._latent_entries)

    def begin_sampling(self, named_conds: dict) -> None:
        self.remember_roles(named_conds)
        self._latent_gates.clear()
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

    def measure_latent_gates(self, run_bare, transformer_options: dict, rows: int) -> None:
        """Latent gates for every chunk's cond not yet measured in this sampling run, one per prompt
        the cond carries. `run_bare` as in `latent_gates`, its sources being rows of the sampling
        call (`rows` of them)."""
        uuids = transformer_options.get("uuids") or []
        indices = transformer_options.get("cond_or_uncond") or [None] * len(uuids)
        if not self.reads_model or not uuids:
            return
        table = getattr(_call, "chunks", None) or {}
        per_chunk = rows // len(uuids)
        pending = {}
        for chunk, key in enumerate(zip(indices, uuids)):
            known = table.get(key)
            cond = key if known is None else known.cond
            if cond not in self._latent_gates and cond not in pending:
                items = 1 if known is None or known.gates is None else min(known.gates.shape[0], per_chunk)
                pending[cond] = [chunk * per_chunk + item for item in range(items)]
        if not pending:
            return
        sources = [row for chunk_rows in pending.values() for row in chunk_rows]
        gates = self.latent_gates(run_bare, None, sources)
        for cond, chunk_rows in pending.items():
            self._latent_gates[cond], gates = gates[: len(chunk_rows)], gates[len(chunk_rows):]

    def latent_gates(self, run_bare, contexts: torch.Tensor | None, sources: list[int]) -> torch.Tensor:
        """(P, membranes) latent gates (Transport.latent_gates) of P prompts; 0 for membranes gated by
        text alone. `run_bare(contexts, sources, pooled)` returns the model's predictions with every
        membrane closed for rows of conditioning `contexts` (R, N, D) (None: the sources' own) whose
        other inputs are those of the caller's rows `sources`, with `pooled` (R, P) as their pooled
        text vectors (None: the sources' own). The concepts and the empty prompt take the first
        prompt's other inputs and their own pooled vectors."""
        transport = self.entries[self._latent_entries[0]].transport
        concept_rows = torch.cat([transport.empty[None]] + [self.entries[i].transport.concept_embeddings
                                                             for i in self._latent_entries])
        pooled = [transport.empty_pooled] + [self.entries[i].transport.concept_pooled for i in self._latent_entries]
        concept_pooled = None if any(p is None for p in pooled) else torch.cat([pooled[0][None], *pooled[1:]])
        concept_predictions = run_bare(concept_rows, [sources[0]] * concept_rows.shape[0], concept_pooled)
        empty_prediction = concept_predictions[:1]
        prompt_shifts = run_bare(contexts, sources, None) - empty_prediction
        columns, offset = [], 1
        for index, entry in enumerate(self.entries):
            if index not in self._latent_entries:
                columns.append(torch.zeros(contexts.shape[0]))
                continue
            count = entry.transport.concept_embeddings.shape[0]
            concept_shifts = concept_predictions[offset: offset + count] - empty_prediction
            columns.append(entry.transport.latent_gates(prompt_shifts, concept_shifts)[:, 0])
            offset += count
        return torch.stack(columns, dim=1)

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

    def row_gates(self, context: torch.Tensor, transformer_options: dict, sigma: torch.Tensor,
                  model_sampling) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, membranes) gates for one batched model call, and the strengths of those rows."""
        in_range = self._in_sampling_range(sigma, model_sampling)
        if transformer_options.get("uuids"):
            gates, strengths = self._chunk_gates(context, transformer_options, in_range)
        else:  # a call that bypassed the guider: each row gated by its own embedding, as a positive
            gates = self.gates_for(context, None) * in_range * self._acting[POSITIVE]
            self.last_gates[POSITIVE] = gates[-1].tolist()
            strengths = self._strengths[POSITIVE].expand(context.shape[0], -1)
        if self.official:
            return gates, self.stack.strengths.expand(context.shape[0], -1)
        if self._ramped:
            strengths = strengths * self._ramp_factors(sigma, model_sampling)
        return gates, strengths

    def _chunk_gates(self, context: torch.Tensor, transformer_options: dict,
                     in_range: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gates and strengths of a guider's batch, each chunk by its cond's role."""
        uuids = transformer_options["uuids"]
        indices = transformer_options.get("cond_or_uncond") or [None] * len(uuids)
        table = getattr(_call, "chunks", None) or {}
        per_chunk = context.shape[0] // len(uuids)
        gates, strengths, roles = [], [], []
        for chunk, key in enumerate(zip(indices, uuids)):
            role, item_gates, cond = table.get(key) or Chunk(POSITIVE, None, key)
            if item_gates is None:  # a path that skipped calc_cond_batch: gate from the embedding alone
                item_gates = self.gates_for(context[chunk * per_chunk: chunk * per_chunk + 1], None)
            gate = _per_row(item_gates, per_chunk)
            if cond in self._latent_gates:
                gate = torch.maximum(gate, _per_row(self._latent_gates[cond], per_chunk))
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

    def _ramp_factors(self, sigma: torch.Tensor, model_sampling) -> torch.Tensor:
        """(membranes,) each membrane's ramp at this step's sigma, read as a percent of sampling
        through the model's own percent -> sigma map (tabulated once per model sampling object)."""
        if self._percent_table is None or self._percent_table[0] is not model_sampling:
            percents = [i / 200 for i in range(1, 200)]  # 0 and 1 map to infinite / zero sigma
            sigmas = [float(model_sampling.percent_to_sigma(p)) for p in percents]
            self._percent_table = (model_sampling, sigmas[::-1], percents[::-1])  # increasing sigma
        _, sigmas, percents = self._percent_table
        percent = float(np.interp(float(sigma.reshape(-1)[0]), sigmas, percents))
        return torch.tensor([e.ramp.factor(percent, e.start_percent, e.end_percent) for e in self.entries])

    def _in_sampling_range(self, sigma: torch.Tensor, model_sampling) -> torch.Tensor:
        """1 for membranes whose start..end range covers this step's sigma, else 0. The sigma
        bounds are computed once per model sampling object, not on every call."""
        if self._sigma_ranges is None or self._sigma_ranges[0] is not model_sampling:
            high = torch.tensor([float(model_sampling.percent_to_sigma(e.start_percent)) for e in self.entries])
            low = torch.tensor([float(model_sampling.percent_to_sigma(e.end_percent)) for e in self.entries])
            self._sigma_ranges = (model_sampling, low, high)
        _, low, high = self._sigma_ranges
        current = float(sigma.reshape(-1)[0])
        return ((low <= current) & (current <= high)).float()


def _per_row(item_gates: torch.Tensor, rows: int) -> torch.Tensor:
    """(items, membranes) -> (rows, membranes) the way ComfyUI spreads a conditioning's items over a
    batch (comfy.utils.repeat_to_batch_size): row r carries item r mod items."""
    return item_gates[torch.arange(rows) % item_gates.shape[0]]


def _rows_of(value, index: torch.Tensor, batch: int):
    """`value` with every tensor of `batch` rows (nested in dicts, lists and tuples, as ControlNet
    residuals are) cut down to the rows `index`; anything else as it is."""
    if torch.is_tensor(value):
        return value[index.to(value.device)] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {key: _rows_of(item, index, batch) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_rows_of(item, index, batch) for item in value)
    return value


def _embedding_of(cond: dict) -> torch.Tensor | None:
    return getattr(cond.get("model_conds", {}).get("c_crossattn"), "cond", None)


def _calc_cond_batch_wrapper(executor, model, conds, x_in, timestep, model_options):
    state = _state_of(model)
    if state is None:
        return executor(model, conds, x_in, timestep, model_options)
    outer = getattr(_call, "chunks", None)
    _call.chunks = state.chunk_table(conds)
    try:
        return executor(model, conds, x_in, timestep, model_options)
    finally:
        _call.chunks = outer


def _apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
    base_model = executor.class_obj
    state = _state_of(base_model)
    if state is None or c_crossattn is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    if not state.hooks.installed:  # the clone inherited an "already injected" flag: install now
        state.hooks.install(state.modules_of(base_model))
    transformer_options = transformer_options or {}
    if state.reads_model:
        pooled_first = isinstance(base_model, POOLED_FIRST_MODELS)

        def run_bare(contexts: torch.Tensor | None, sources: list[int], pooled: torch.Tensor | None) -> torch.Tensor:
            """The bare model at the noisy latent of the call's first row, never more rows per call than
            this call has (ComfyUI sized it to fit in memory)."""
            predictions = []
            for start in range(0, len(sources), x.shape[0]):
                index = torch.tensor(sources[start: start + x.shape[0]])
                rows = len(index)
                context = _rows_of(c_crossattn, index, x.shape[0]) if contexts is None else contexts[start: start + rows]
                extra = _rows_of(kwargs, index, x.shape[0])
                if pooled_first and pooled is not None and torch.is_tensor(extra.get("y")) \
                        and pooled.shape[1] < extra["y"].shape[1]:
                    own = pooled[start: start + rows].to(extra["y"])
                    extra["y"] = torch.cat([own, extra["y"][:, own.shape[1]:]], dim=1)
                with gates_active(state.stack, torch.zeros(rows, state.stack.membrane_count)):
                    # the model itself (executor.original), past the APPLY_MODEL wrappers below ours: see _pre_pass_options
                    predictions.append(executor.original(
                        x[:1].expand(rows, *x.shape[1:]), t[:1].expand(rows), _rows_of(c_concat, index, x.shape[0]),
                        context.to(c_crossattn), _rows_of(control, index, x.shape[0]),
                        _pre_pass_options(transformer_options, rows), **extra))
            return torch.cat(predictions)
        state.measure_latent_gates(run_bare, transformer_options, x.shape[0])
    gates, strengths = state.row_gates(c_crossattn, transformer_options, t, base_model.model_sampling)
    with gates_active(state.stack, gates, strengths):
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def _pre_pass_options(transformer_options: dict, rows: int) -> dict:
    """transformer_options for a latent-gate pre-pass call of `rows` rows, one prompt per row: every
    key the sampling call carries (patches, sigmas, sample_sigmas, ...) with the chunk keys ComfyUI's
    calc_cond_batch sets given for these rows, since attention patches read them on every call.

    Wrappers wrap sampling steps and may keep per-step state: the host's own DIFFUSION_MODEL wrapper,
    EasyCache's, caches each call's output by uuid and takes the first call it sees as the cond that
    decides when a step is skipped, so a pre-pass it saw would become its reference cond or be
    answered from its cache. Patches change what the model computes and must hold in the pre-pass as
    in sampling. So the pre-pass keeps the patches and runs past the wrappers."""
    options = dict(transformer_options)
    # Each row is a chunk of its own, labelled conditional (0): the rows are prompts whose conditional
    # predictions the gate compares with one another, so one label for all keeps role-keyed patches from
    # telling them apart (IPAdapter gives each label its own image prompt), and 0 keeps SAG from taking a
    # pre-pass row's attention for the uncond's.
    options["cond_or_uncond"] = [0] * rows
    options["uuids"] = [uuid4() for _ in range(rows)]  # no cond's uuid: these rows are no sampling cond
    if "wrappers" in options:
        options["wrappers"] = {kind: wrappers for kind, wrappers in options["wrappers"].items()
                               if kind != WrappersMP.DIFFUSION_MODEL}
    return options


def _outer_sample_wrapper(executor, *args, **kwargs):
    guider = executor.class_obj
    state = guider.model_patcher.get_attachment(KEY) if hasattr(guider, "model_patcher") else None
    if state is not None:
        state.begin_sampling(getattr(guider, "conds", None) or {})
    result = executor(*args, **kwargs)
    if state is not None:
        _send_gates_to_frontend(state)
    return result


def _state_of(base_model) -> MembraneState | None:
    patcher = getattr(base_model, "current_patcher", None)
    return patcher.get_attachment(KEY) if patcher is not None else None


def gate_report(state: MembraneState) -> list[dict]:
    """What the frontend shows: each membrane's gates in the last sampled step."""
    report = []
    for index, entry in enumerate(state.entries):
        row = {"membrane": entry.membrane.name, "concepts": entry.membrane.concept_labels, "node": entry.node_id,
               "rank": entry.membrane.rank, "layers": len(entry.membrane.layers), "transport": entry.transport.mode.value}
        for kind, gates in state.last_gates.items():
            row[kind] = round(gates[index], 4)
        report.append(row)
    return report


def _send_gates_to_frontend(state: MembraneState) -> None:
    try:
        from server import PromptServer
    except ImportError:  # running without the server (scripts, in-process tests)
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync("spm.gates", {"membranes": gate_report(state)}, server.client_id)


def with_membrane(model, entry: MembraneEntry):
    """A clone of `model` with `entry` added to its membranes. `model` itself is never changed;
    everything that can fail is checked before the clone is made."""
    if entry.rows not in ROWS_CHOICES:
        raise SPMError(f"rows is {entry.rows!r}; choose one of {', '.join(repr(r) for r in ROWS_CHOICES)}")
    for name, value in (("strength", entry.strength), ("negative_strength", entry.negative_strength)):
        if value is not None and not (math.isfinite(value) and abs(value) <= MAX_STRENGTH):
            raise SPMError(f"{name} is {value}; give a number between -{MAX_STRENGTH:g} and {MAX_STRENGTH:g} "
                           "(1.0 = as trained, 0 = off)")
    if entry.transport.mode is TransportMode.OFFICIAL and entry.rows == NEGATIVE_ONLY:
        raise SPMError(f"transport 'official_code' with rows {NEGATIVE_ONLY!r} would never act: the official scripts gate "
                       "every row by the positive prompt, so a membrane kept off the positive rows stays closed on all of "
                       f"them (negative_strength is not used either). Set rows to {POSITIVE_ONLY!r} to reproduce the "
                       f"official scripts, or choose another transport to act on negative rows only")
    if entry.transport.mode is TransportMode.OFFICIAL and entry.ramp is not Ramp.CONSTANT:
        raise SPMError("transport 'official_code' reproduces the official scripts, which have one strength for the "
                       "whole run: set ramp to 'constant'")
    if not 0.0 <= entry.start_percent <= entry.end_percent <= 1.0:
        raise SPMError(f"sampling range {entry.start_percent}..{entry.end_percent} is invalid; need 0 <= start <= end <= 1")
    previous = model.get_attachment(KEY)
    state = MembraneState((previous.entries if previous else ()) + (entry,), model)
    patched = model.clone()
    patched.set_attachments(KEY, state)
    patched.set_injections(KEY, [PatcherInjection(inject=state.inject, eject=state.eject)])
    for wrapper_type, wrapper in ((WrappersMP.CALC_COND_BATCH, _calc_cond_batch_wrapper),
                                  (WrappersMP.APPLY_MODEL, _apply_model_wrapper),
                                  (WrappersMP.OUTER_SAMPLE, _outer_sample_wrapper)):
        patched.remove_wrappers_with_key(wrapper_type, KEY)
        patched.add_wrapper_with_key(wrapper_type, KEY, wrapper)
    return patched


def without_membranes(model):
    """A clone with no membrane machinery (for static merges)."""
    patched = model.clone()
    patched.remove_attachments(KEY)
    patched.remove_injections(KEY)
    for wrapper_type in (WrappersMP.CALC_COND_BATCH, WrappersMP.APPLY_MODEL, WrappersMP.OUTER_SAMPLE):
        patched.remove_wrappers_with_key(wrapper_type, KEY)
    return patched


def state_of(model) -> MembraneState:
    state = model.get_attachment(KEY)
    if state is None:
        raise SPMError("this MODEL carries no membranes: connect it through an SPM Load Membrane node first")
    return state

