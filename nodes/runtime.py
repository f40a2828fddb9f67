"""How membranes ride on a ComfyUI MODEL: the one place that touches ModelPatcher.

An SPM Load Membrane node returns a clone that carries a `MembraneState` attachment (every membrane of the
chain, fused into one stack), an injection that installs the stack's forward hooks when ComfyUI
loads the model (and removes them when it unloads), and two keyed wrappers:
  CALC_COND_BATCH  computes each conditioning's gates once (by its uuid) from its embedding and,
                   when an SPM Text Encode made it, its token ids;
  APPLY_MODEL      assembles the per-row gate matrix for the batched call (chunks from
                   transformer_options["uuids"]) and runs the model inside the stack's gate context;
                   for latent transport, the first call of a sampling run first asks the bare model
                   about each cond and each concept (extra calls, membranes closed, with the sampling
                   call's patches but past the wrappers below ours: _pre_pass_options).
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
from uuid import uuid4

import comfy.lora
import numpy as np
import torch
from comfy.patcher_extension import PatcherInjection, WrappersMP

from ..spm_core.errors import SPMError, SPMModelMismatch
from ..spm_core.file_format import is_membrane_layer
from ..spm_core.membrane import GateLaw, Membrane
from ..spm_core.ramp import Ramp
from ..spm_core.stack import InstalledHooks, MembraneStack, MembraneUse, gates_active, module_shape
from ..spm_core.transport import Transport, TransportMode
from .encode import TOKENS_KEY, TOKENS_OF_KEY, embedding_fingerprint

KEY = "spm_membranes"
POSITIVE_ONLY, NEGATIVE_ONLY, POSITIVE_AND_NEGATIVE = "positive only", "negative only", "positive and negative"
ROWS_CHOICES = (POSITIVE_ONLY, NEGATIVE_ONLY, POSITIVE_AND_NEGATIVE)
MAX_STRENGTH = 1e4
GATE_CACHE_SIZE = 512
POSITIVE, NEGATIVE = "positive", "negative"
NEGATIVE_COND_NAMES = frozenset({"negative", "empty_negative_prompt"})  # guider names of negative-role conds
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
    """ComfyUI's own LoRA key map restricted to SPM layers, and those layers' shapes."""
    key_map = {name: key[: -len(".weight")] for name, key in comfy.lora.model_lora_keys_unet(model.model, {}).items()
               if is_membrane_layer(name)}
    if not key_map:
        raise SPMModelMismatch(f"{type(model.model).__name__} has no UNet transformer blocks; SPM membranes apply to "
                               "Stable Diffusion 1.x / 2.x / XL UNets")
    shapes = {key: module_shape(model.model.get_submodule(key)) for key in set(key_map.values())}
    return key_map, shapes


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
        self._latent_gates: dict[object, torch.Tensor] = {}  # uuid -> (membranes,), for the sampling run in progress
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
        """(membranes,) gates for one conditioning: embedding (1, N, D)."""
        tokens = None if token_ids is None else [token_ids]
        return torch.cat([entry.transport.gates(embedding, tokens)[0] for entry in self.entries])

    def cond_gates(self, cond: dict, tokens_by_embedding: dict) -> torch.Tensor | None:
        """(membranes,) gates for one cond dict from its own embedding (and the token ids recorded for
        that embedding, if any), cached; None when it carries no cross-attention."""
        embedding = _embedding_of(cond)
        if embedding is None:
            return None
        key = (cond.get("uuid"), id(embedding))
        cached = self._gates.get(key)
        if cached is None or cached[0]() is not embedding:  # a dead reference: the id was reused
            cached = (weakref.ref(embedding), self.gates_for(embedding[:1], tokens_by_embedding.get(self.fingerprint(embedding))))
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

    def measure_latent_gates(self, run_bare, x: torch.Tensor, context: torch.Tensor, transformer_options: dict) -> None:
        """Latent gates for every chunk's cond not yet measured in this sampling run, all at the
        noisy latent of the batch's first row."""
        uuids = transformer_options.get("uuids") or []
        pending = [(chunk, uuid) for chunk, uuid in enumerate(uuids) if uuid not in self._latent_gates]
        if not self.reads_model or not pending:
            return
        per_chunk = x.shape[0] // len(uuids)
        contexts = torch.cat([context[chunk * per_chunk: chunk * per_chunk + 1] for chunk, _ in pending])
        for gates, (_, uuid) in zip(self.latent_gates(run_bare, x[:1], contexts), pending):
            self._latent_gates[uuid] = gates

    def latent_gates(self, run_bare, reference: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
        """(P, membranes) latent gates (Transport.latent_gates) of contexts (P, N, D) at the noisy
        latent `reference` (1, ...); 0 for membranes gated by text alone. `run_bare(x, context)`
        returns the model's prediction with every membrane closed."""
        empty = self.entries[self._latent_entries[0]].transport.empty[None]
        concept_rows = torch.cat([empty] + [self.entries[i].transport.concept_embeddings for i in self._latent_entries])
        concept_predictions = run_bare(reference.expand(concept_rows.shape[0], *reference.shape[1:]), concept_rows)
        empty_prediction = concept_predictions[:1]
        prompt_shifts = run_bare(reference.expand(contexts.shape[0], *reference.shape[1:]), contexts) - empty_prediction
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

    def chunk_table(self, cond_lists) -> dict[tuple[int, object], tuple[str, torch.Tensor | None]]:
        """(role, gates) per (list index, uuid) for one calc_cond_batch call. ComfyUI's
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
                table[(index, cond.get("uuid"))] = (role, self.cond_gates(cond, tokens_by_embedding))
        return table

    def row_gates(self, context: torch.Tensor, transformer_options: dict, sigma: torch.Tensor,
                  model_sampling) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, membranes) gates for one batched model call, and the strengths of those rows."""
        in_range = self._in_sampling_range(sigma, model_sampling)
        if transformer_options.get("uuids"):
            gates, strengths = self._chunk_gates(context, transformer_options, in_range)
        else:  # a call that bypassed the guider: each row gated by its own embedding, as a positive
            gates = torch.stack([self.gates_for(context[r: r + 1], None) for r in range(context.shape[0])])
            gates = gates * in_range * self._acting[POSITIVE]
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
        gates, strengths = [], []
        for chunk, (index, uuid) in enumerate(zip(indices, uuids)):
            role, gate = table.get((index, uuid), (POSITIVE, None))
            if gate is None:  # a path that skipped calc_cond_batch: gate from the embedding alone
                gate = self.gates_for(context[chunk * per_chunk: chunk * per_chunk + 1], None)
            if uuid in self._latent_gates:
                gate = torch.maximum(gate, self._latent_gates[uuid])
            gate = gate * in_range * self._acting[role]
            self.last_gates[role] = gate.tolist()
            gates.append(gate.expand(per_chunk, -1))
            strengths.append(self._strengths[role].expand(per_chunk, -1))
        if self.official:  # the official code: the first positive prompt's gate for every row of the batch
            roles = [table.get((index, uuid), (POSITIVE, None))[0] for index, uuid in zip(indices, uuids)]
            shared = gates[roles.index(POSITIVE)] if POSITIVE in roles else gates[0]
            gates = [shared[:1].expand(per_chunk, -1)] * len(gates)
            self.last_gates = {role: shared[0].tolist() for role in set(roles)}
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
        def run_bare(rows_x: torch.Tensor, rows_context: torch.Tensor) -> torch.Tensor:
            rows = rows_x.shape[0]
            extra = {k: v[:1].expand(rows, *v.shape[1:]) if torch.is_tensor(v) and v.shape[0] == x.shape[0] else v
                     for k, v in kwargs.items()}
            concat = None if c_concat is None else c_concat[:1].expand(rows, *c_concat.shape[1:])
            with gates_active(state.stack, torch.zeros(rows, state.stack.membrane_count)):
                # the model itself (executor.original), past the APPLY_MODEL wrappers below ours: see _pre_pass_options
                return executor.original(rows_x, t[:1].expand(rows), concat, rows_context.to(c_crossattn), None,
                                         _pre_pass_options(transformer_options, rows), **extra)
        state.measure_latent_gates(run_bare, x, c_crossattn, transformer_options)
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

