"""A stack of membranes bound to one model, and the forward hooks that apply it.

Binding matches every membrane layer to a model module (through a key map the host provides)
and checks shapes. The hooks read the gates of the current model call from their stack's own gate
context (one per thread): a hook whose stack has no active gates does nothing, so model branches
that share the same torch modules but not the membranes are never affected. The context lives on the
stack, not in this module, so whatever copy of spm_core a caller imported (the pack's, or a script's
top-level `spm_core`) opens the same gates the hooks read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import SPMError, SPMModelMismatch
from .file_format import is_text_token_layer, module_key_map
from .membrane import FusedLayer, GateLaw, LayerWeights, Membrane


@dataclass(frozen=True)
class MembraneUse:
    """A membrane as a graph uses it: its weights plus how strongly and how it is gated."""

    membrane: Membrane
    strength: float = 1.0


def text_tokens_handed_on(output: tuple) -> int:
    """How many text tokens lead the single blocks' input, read from the output of a block that returns
    (image tokens, text tokens) (Flux's double blocks)."""
    return output[1].shape[1]


def module_shape(module: torch.nn.Module) -> tuple[int, int, bool]:
    """(out, in, is_1x1_conv) of a Linear or 1x1 Conv2d, read from its weight."""
    weight = module.weight
    if weight.ndim == 4:
        if tuple(weight.shape[2:]) != (1, 1):
            raise SPMModelMismatch(f"{type(module).__name__} has a {tuple(weight.shape[2:])} kernel; membranes fit 1x1 convolutions only")
        return weight.shape[0], weight.shape[1], True
    if weight.ndim != 2:
        raise SPMModelMismatch(f"{type(module).__name__} with a {weight.ndim}-D weight cannot carry a membrane")
    return weight.shape[0], weight.shape[1], False


class MembraneStack:
    """Every membrane of a MODEL, fused per layer. Built once per distinct chain of SPM Load Membrane
    nodes; the gate matrix for a call is (rows x membranes) in `uses` order."""

    def __init__(self, uses: Sequence[MembraneUse], key_map: Mapping[str, str],
                 module_shapes: Mapping[str, tuple[int, int, bool]], gate_law: GateLaw = GateLaw.LINEAR) -> None:
        self.uses = tuple(uses)
        self.gate_law = gate_law
        parts: dict[str, list[tuple[int, LayerWeights]]] = {}
        for index, use in enumerate(self.uses):
            for module_key, layer in bind_membrane(use.membrane, key_map, module_shapes).items():
                parts.setdefault(module_key, []).append((index, layer))
        text_token_keys = {key_map[name] for use in self.uses for name in use.membrane.layers if is_text_token_layer(name)}
        if text_token_keys and gate_law is GateLaw.OFFICIAL_MERGE:
            raise SPMError("the official code's merge has no form for layers that act on text tokens only (Flux single blocks)")
        self.layers = {key: FusedLayer(layer_parts, key in text_token_keys) for key, layer_parts in parts.items()}
        self.strengths = torch.tensor([use.strength for use in self.uses], dtype=torch.float32)
        self._context = _GateContext()

    @property
    def membrane_count(self) -> int:
        return len(self.uses)

    @property
    def reads_text_tokens(self) -> bool:
        """Whether some layer acts on text tokens only, so the hooks must learn how many lead its input."""
        return any(layer.text_tokens_only for layer in self.layers.values())

    def note_text_stream(self, module: torch.nn.Module, inputs: tuple, output: tuple) -> None:
        """A forward hook for a text-stream block (text_tokens_handed_on)."""
        self._context.text_tokens = text_tokens_handed_on(output)

    def row_gates(self, gates: torch.Tensor, strengths: torch.Tensor | None = None) -> torch.Tensor:
        """Effective per-row gates: the gate law applied, times each membrane's strength, or times
        `strengths` (rows x membranes) where rows differ (e.g. a separate strength for negative rows)."""
        return self.gate_law.apply(gates.to(torch.float32)) * (self.strengths if strengths is None else strengths)

    @contextlib.contextmanager
    def gates_active(self, gates: torch.Tensor, strengths: torch.Tensor | None = None) -> Iterator[None]:
        """Within this block, hooks of this stack apply `gates` (rows x membranes, before strength) at
        the stack's strengths, or at `strengths` (rows x membranes) when given. The official merge law
        always uses the stack's strengths."""
        if gates.ndim != 2 or gates.shape[1] != self.membrane_count:
            raise ValueError(f"gates must be (rows, {self.membrane_count}), got {tuple(gates.shape)}")
        if strengths is not None and strengths.shape != gates.shape:
            raise ValueError(f"strengths must be {tuple(gates.shape)} like the gates, got {tuple(strengths.shape)}")
        previous = self._context.call
        row_gates = self.row_gates(gates, strengths)
        # all gates closed: no call, so hooks exit at once
        self._context.call = _CallGates(row_gates, gates.to(torch.float32)) if bool(row_gates.any()) else None
        try:
            yield
        finally:
            self._context.call = previous

    def current_row_gates(self) -> torch.Tensor | None:
        """The effective (rows x membranes) gates this stack applies in the current model call, or
        None when it is closed or inactive: for inspecting what a sampler actually used."""
        call = self._context.call
        return None if call is None else call.row_gates

    def layer_output(self, layer: FusedLayer, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        """What a hook of this stack returns for one bound layer's call on `x`: `output` with the
        layer's membranes added at the gates of the current call, or None while they are closed."""
        call = self._context.call
        if call is None:
            return None
        if self.gate_law is GateLaw.OFFICIAL_MERGE:
            return output + layer.merged_delta(x, _expand_rows(call.gates, x.shape[0]), self.strengths)
        gates, open_rows = call.prepared(x.shape[0], x.device, x.dtype)
        if layer.text_tokens_only:
            text_tokens = self._context.text_tokens
            if text_tokens is None or not 0 < text_tokens < x.shape[1]:
                raise SPMError(f"a membrane layer that acts on text tokens only met {x.shape[1]} tokens, but the "
                               f"model's text stream gave {text_tokens}: this model does not lay out its tokens as Flux does")
            return layer.add_to_text_tokens(output, x, gates, text_tokens)
        return layer.add_to(output, x, gates, open_rows)

    def folded_weights(self, weights: Mapping[str, torch.Tensor], gates: torch.Tensor) -> dict[str, torch.Tensor]:
        """The static-gate fast path: for gates (membranes,) that hold for every row and every
        step, each adapted layer's weight with the membranes folded in, `W + U diag(g) D`, keyed
        like `layers`, so the model can run without hooks. The base `weights` are not modified;
        the price is one new copy of every adapted weight (SD1.5: ~267M values, ~1 GB fp32)."""
        if gates.shape != (self.membrane_count,):
            raise ValueError(f"gates must be ({self.membrane_count},), got {tuple(gates.shape)}")
        if self.gate_law is GateLaw.OFFICIAL_MERGE:
            raise SPMError("the official code's merge is applied by hooks only; fold with the linear or squared law")
        effective = self.row_gates(gates.unsqueeze(0))[0]
        return {key: layer.folded_weight(weights[key], effective) for key, layer in self.layers.items()}


def apply_membranes(model: torch.nn.Module, uses: Sequence[MembraneUse],
                    key_map: Mapping[str, str] | None = None) -> tuple[MembraneStack, InstalledHooks]:
    """Bind membranes to a torch UNet and install their hooks, without ComfyUI: `key_map` maps file
    layer names to module names (default: diffusers naming, `file_format.module_key_map`). The
    hooks act only inside `stack.gates_active(gates)`; `hooks.remove()` takes them off."""
    key_map = dict(key_map) if key_map is not None else module_key_map(name for name, _ in model.named_modules())
    wanted = {key_map[name] for use in uses for name in use.membrane.layers if name in key_map}
    modules = {key: model.get_submodule(key) for key in wanted}
    stack = MembraneStack(uses, key_map, {key: module_shape(module) for key, module in modules.items()})
    hooks = InstalledHooks(stack)
    hooks.install(modules)
    return stack, hooks


def bind_membrane(membrane: Membrane, key_map: Mapping[str, str],
                  module_shapes: Mapping[str, tuple[int, int, bool]]) -> dict[str, LayerWeights]:
    """Map each layer of `membrane` to a model module key, checking that it exists and fits."""
    source = membrane.metadata.get("source", membrane.name)
    bound: dict[str, LayerWeights] = {}
    unmapped = [name for name in membrane.layers if name not in key_map]
    if unmapped:
        raise SPMModelMismatch(
            f"{source}: {len(unmapped)} of {len(membrane.layers)} membrane layers have no matching layer in "
            f"this model (e.g. {unmapped[0]}). The membrane is for {membrane.architecture}; "
            "is the model of the same family (SD1.x / SD2.x / SDXL)?")
    for name, layer in membrane.layers.items():
        module_key = key_map[name]
        if module_key not in module_shapes:
            raise SPMModelMismatch(f"{source}: layer {name} maps to {module_key}, which is not a Linear or 1x1 convolution in this model")
        out_features, in_features, conv = module_shapes[module_key]
        if layer.down.shape[1] != in_features or layer.up.shape[0] != out_features:
            raise SPMModelMismatch(
                f"{source}: layer {name} is {layer.up.shape[0]}x{layer.down.shape[1]} but the model's layer is "
                f"{out_features}x{in_features}. The membrane is for {membrane.architecture}; it does not fit this model.")
        if module_key in bound:
            raise SPMModelMismatch(f"{source}: two layers of the file adapt the same model layer {module_key}")
        # a 1x1 conv stored as a matrix (allowed by stock loaders) acts as the model's layer does
        bound[module_key] = layer if layer.conv == conv else dataclasses.replace(layer, conv=conv)
    return bound


class _CallGates:
    """The effective gates of one model call. Hooks see the same row count, device and dtype
    over and over, so the row expansion, the device copy and the search for open rows happen
    once per call instead of once per layer."""

    def __init__(self, row_gates: torch.Tensor, gates: torch.Tensor) -> None:
        self.row_gates = row_gates
        self.gates = gates  # before the gate law and strengths: what the official merge needs
        self._prepared: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, slice | None]] = {}

    def prepared(self, rows: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, slice | None]:
        """(rows x membranes gates on `device` in `dtype`, the smallest row range outside of which
        every gate is zero, or None when that is every row)."""
        key = (rows, device, dtype)
        if key not in self._prepared:
            gates = _expand_rows(self.row_gates, rows)
            open_rows = gates.any(dim=1).nonzero().flatten().tolist()
            # a closed CFG chunk (e.g. uncond rows at gate 0) is skipped when it lies at either end
            row_range = None if len(open_rows) == rows else slice(open_rows[0], open_rows[-1] + 1)
            self._prepared[key] = (gates.to(device=device, dtype=dtype), row_range)
        return self._prepared[key]


class _GateContext(threading.local):
    """A stack's gates of the model call in progress, per thread (ComfyUI may run batches in threads)."""

    def __init__(self) -> None:
        self.call: _CallGates | None = None
        self.text_tokens: int | None = None  # what the last text-stream block gave (note_text_stream)


def _expand_rows(row_gates: torch.Tensor, rows: int) -> torch.Tensor:
    if row_gates.shape[0] == rows:
        return row_gates
    if rows % row_gates.shape[0]:
        raise RuntimeError(f"membrane gates cover {row_gates.shape[0]} rows but the layer sees {rows}")
    return row_gates.repeat_interleave(rows // row_gates.shape[0], dim=0)


class InstalledHooks:
    """Forward hooks of one stack on one set of modules. `install` and `remove` are idempotent."""

    def __init__(self, stack: MembraneStack) -> None:
        self.stack = stack
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self, modules: Mapping[str, torch.nn.Module], text_streams: Sequence[torch.nn.Module] = ()) -> None:
        """Hooks on the stack's layers (`modules` by module key) and, when some layer acts on text
        tokens only, on `text_streams`: the blocks that return (image tokens, text tokens)."""
        if self._handles:
            return
        missing = [key for key in self.stack.layers if key not in modules]
        if missing:
            raise SPMModelMismatch(f"model has no module {missing[0]} for the membrane stack")
        if self.stack.reads_text_tokens and not text_streams:
            raise SPMModelMismatch("the membranes act on text tokens only in some layers, and the model has no text stream "
                                   "to count them from (Flux's double blocks)")
        for key, layer in self.stack.layers.items():
            self._handles.append(modules[key].register_forward_hook(self._hook_for(layer)))
        if self.stack.reads_text_tokens:
            self._handles += [block.register_forward_hook(self.stack.note_text_stream) for block in text_streams]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self.stack.layers.values():
            layer.forget_device_copies()

    def _hook_for(self, layer: FusedLayer):
        stack = self.stack

        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            return stack.layer_output(layer, inputs[0], output)

        return hook
