"""How membranes ride on a ComfyUI MODEL: the ModelPatcher wiring.

An SPM Load Membrane node returns a clone that carries a `MembraneState` attachment (nodes/gating.py:
every membrane of the chain, fused into one stack, and how each row is gated), an injection that
installs the stack's forward hooks when ComfyUI loads the model (and removes them when it unloads),
and three keyed wrappers:
  CALC_COND_BATCH  builds the call's chunk table: each cond's role and text gates (by list index and
                   uuid, with the cond's identity), for the model calls below it;
  APPLY_MODEL      assembles the per-row gate matrix for the batched call (chunks from
                   transformer_options["uuids"]) and runs the model inside the stack's gate context;
                   for latent transport, the first call that meets a cond first lets the bare model
                   look a few steps ahead on it, then asks it about the cond and about each concept
                   there (extra calls, membranes closed, no more rows per call
                   than the sampling call has, with the sampling call's patches, control and per-row
                   inputs but past the wrappers below ours: _pre_pass_options); for guarded transport,
                   a second look-ahead with the membranes open, and every breached row's text
                   conditioning (and SDXL's pooled vector) moved to the concept's words;
  OUTER_SAMPLE     learns each cond's role from the guider's named conds before sampling (by uuid:
                   ComfyUI's "cond_or_uncond" is a chunk's index in the guider's list, not a role)
                   and sends the gates that were used to the frontend when sampling ends.
Other places that touch a ModelPatcher, each for its own reason: nodes/export.py adds a membrane's
weights as ordinary patches (a static merge), nodes/training.py loads the model to train on it.
"""

from __future__ import annotations

from uuid import uuid4

import comfy.model_base
import comfy.samplers
import torch
from comfy.patcher_extension import PatcherInjection, WrappersMP

from ..spm_core.errors import SPMError
from ..spm_core.transport import LATENT_LOOKAHEAD_STEPS
from .architectures import check_membrane_fits, membrane_layers
from .frontend import send_gate_report
from .gating import MembraneEntry, MembraneState

KEY = "spm_membranes"
# models whose vector input `y` starts with the prompt's pooled text vector (the rest: sizes, crops)
POOLED_FIRST_MODELS = (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner)
LOOKAHEAD_SCHEDULE = 20  # steps of the schedule the look-ahead takes its first steps from
TEXT_TO_IMAGE_START = 0.99  # a first sigma at least this share of the largest: sampling starts from pure noise


def membrane_layers_of(model) -> tuple[dict[str, str], dict[str, tuple[int, int, bool]]]:
    """ComfyUI's own LoRA key map restricted to membrane layers (SD UNets, Flux: nodes.architectures),
    and those layers' shapes."""
    return membrane_layers(model)


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


def _calc_cond_batch_wrapper(executor, model, conds, x_in, timestep, model_options):
    state = _state_of(model)
    if state is None:
        return executor(model, conds, x_in, timestep, model_options)
    with state.calling(conds):
        return executor(model, conds, x_in, timestep, model_options)


def _apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
    base_model = executor.class_obj
    state = _state_of(base_model)
    if state is None or c_crossattn is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    if not state.hooks.installed:  # the clone inherited an "already injected" flag: install now
        state.install_hooks(base_model)
    transformer_options = transformer_options or {}
    table = state.call_chunks()
    if state.reads_model:
        run_model = _model_runner(executor, state, x, c_concat, c_crossattn, control, transformer_options, kwargs)
        reference, sigmas = _latent_gate_start(base_model.model_sampling, x, t)
        state.measure_latent_gates(run_model, transformer_options, x.shape[0], table, reference, sigmas)
        c_crossattn, kwargs = _guarded(executor, state, c_crossattn, transformer_options, t, table, kwargs)
    gates, strengths = state.call_gates(c_crossattn, transformer_options, t, base_model.model_sampling, table)
    with state.stack.gates_active(gates, strengths):
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def _model_runner(executor, state: MembraneState, x, c_concat, c_crossattn, control, transformer_options: dict,
                  kwargs: dict):
    """`run_model` (MembraneState.latent_gates) for the APPLY_MODEL call these are the arguments of."""
    pooled_first = isinstance(executor.class_obj, POOLED_FIRST_MODELS)

    def run_model(contexts: torch.Tensor | None, sources: list[int], pooled: torch.Tensor | None, latents: torch.Tensor,
                  sigma: torch.Tensor, gates: torch.Tensor | None = None, strengths: torch.Tensor | None = None) -> torch.Tensor:
        """The model's denoised predictions, membranes closed or at `gates`, never more rows per call
        than this call has (ComfyUI sized it to fit in memory)."""
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
            closed = gates is None
            row_gates = torch.zeros(rows, state.stack.membrane_count) if closed else gates[start: start + rows]
            with state.stack.gates_active(row_gates, None if closed else strengths[start: start + rows]):
                # the model itself (executor.original), past the APPLY_MODEL wrappers below ours: see _pre_pass_options
                predictions.append(executor.original(
                    latents[start: start + rows].to(x), sigma.reshape(1).to(x).expand(rows), _rows_of(c_concat, index, x.shape[0]),
                    context.to(c_crossattn), _rows_of(control, index, x.shape[0]),
                    _pre_pass_options(transformer_options, rows), **extra))
        return torch.cat(predictions)

    return run_model


def _guarded(executor, state: MembraneState, c_crossattn: torch.Tensor, transformer_options: dict, t: torch.Tensor,
             table: dict, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """The call's text conditioning (and, where the model reads one first in `y`, the pooled text
    vector) with every breached row moved towards its concept's words (MembraneState.guarded_inputs)."""
    found = state.call_breaches(c_crossattn, transformer_options, t, executor.class_obj.model_sampling, table)
    if found is None:
        return c_crossattn, kwargs
    y = kwargs.get("y")
    width = next((e.transport.concept_pooled.shape[1] for e in state.entries
                  if e.transport.guards and e.transport.concept_pooled is not None), None)
    pooled = y[:, :width] if isinstance(executor.class_obj, POOLED_FIRST_MODELS) and torch.is_tensor(y) and width else None
    context, pooled = state.guarded_inputs(c_crossattn, pooled, *found)
    if pooled is None:
        return context, kwargs
    return context, {**kwargs, "y": torch.cat([pooled, y[:, pooled.shape[1]:]], dim=1)}


def _latent_gate_start(model_sampling, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The noisy latent (1, ...) the latent gate's look-ahead starts from and the sigmas it steps
    through. Its operating point (LATENT_THRESHOLD, LATENT_SATURATION) was calibrated from the start of
    text-to-image sampling, pure noise at the largest sigma: a run that starts there (within 1%) starts
    the look-ahead at its own first row. A run that starts lower (img2img, inpainting, a later stage)
    holds a picture in its latent, which moves every prompt's prediction alike and lifts unrelated
    prompts' cosines; it starts from fixed noise at the largest sigma instead, where the calibration
    holds."""
    sigma_max = model_sampling.sigma_max.reshape(1).to(t)
    if float(t[0]) >= TEXT_TO_IMAGE_START * float(sigma_max[0]):
        reference, start = x[:1], t[:1]
    else:
        noise = torch.randn(x[:1].shape, generator=torch.Generator().manual_seed(0)).to(x)
        reference, start = model_sampling.noise_scaling(sigma_max, noise, torch.zeros_like(noise), max_denoise=True), sigma_max
    return reference, latent_gate_sigmas(model_sampling, start)


def latent_gate_sigmas(model_sampling, start: torch.Tensor) -> list[torch.Tensor]:
    """The look-ahead's sigmas: the first LATENT_LOOKAHEAD_STEPS steps of a 20-step "normal" schedule
    (the miniature world's sampling, where its operating point was calibrated), from `start`."""
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "normal", LOOKAHEAD_SCHEDULE)[: LATENT_LOOKAHEAD_STEPS + 1]
    return [start.reshape(()).float().cpu()] + [sigma.float().cpu() for sigma in sigmas[1:]]


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
        send_gate_report(state)
    return result


def _state_of(base_model) -> MembraneState | None:
    patcher = getattr(base_model, "current_patcher", None)
    return patcher.get_attachment(KEY) if patcher is not None else None


def with_membrane(model, entry: MembraneEntry):
    """A clone of `model` with `entry` added to its membranes (the entry checked itself when built).
    `model` itself is never changed; everything that can fail is checked before the clone is made."""
    check_membrane_fits(model, entry.membrane, entry.transport)
    previous = model.get_attachment(KEY)
    state = MembraneState((previous.entries if previous else ()) + (entry,), *membrane_layers_of(model))
    patched = model.clone()
    patched.set_attachments(KEY, state)
    # forward hooks live exactly while ComfyUI has the model loaded
    patched.set_injections(KEY, [PatcherInjection(inject=lambda patcher: state.install_hooks(patcher.model),
                                                  eject=lambda patcher: state.hooks.remove())])
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

