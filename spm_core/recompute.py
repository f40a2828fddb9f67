"""Gradient checkpointing for training: a block keeps only its inputs for backward and runs again
inside backward to get the rest, so the activations of one block at a time are held instead of
every block's (the memory a membrane's gradient through a 12B Flux needs at 512 px).

Written as an autograd Function, not with torch.utils.checkpoint: the reentrant form refuses
`torch.autograd.grad`, which the trainer uses so that no base weight ever gets a gradient, and
the non-reentrant form cannot recompute blocks that add their residuals into their inputs in
place, as ComfyUI's Flux blocks do. Here every tensor argument is copied before the block sees it
(in the first run and in the recomputation), the membrane's parameters are inputs of the Function
so their gradients come back through it, and `replay` puts back, during the recomputation,
whatever switched the membrane on or off at the time of the first run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

Replay = Callable[[], AbstractContextManager]


def recomputed(function: Callable[..., Any], parameters: Sequence[torch.Tensor],
               replay_factory: Callable[[], Replay]) -> Callable[..., Any]:
    """`function` (a block's forward: tensors in, a tensor or a tuple of tensors out) as a
    checkpointed call. `parameters`: the trained tensors used inside it (their gradients come back
    through the recomputation). `replay_factory()` is called at each forward and returns what to
    enter, each time the block is recomputed, to see the switches as they were then."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled() or _has_nested_gradient(args, kwargs):
            return function(*args, **kwargs)  # nothing to save, or an input we cannot route through
        positions = [i for i, value in enumerate(args) if torch.is_tensor(value)]
        keys = [key for key, value in kwargs.items() if torch.is_tensor(value)]
        tensors = [args[i] for i in positions] + [kwargs[key] for key in keys]
        # what the recomputation calls with: no tensor (those are the Function's saved inputs, or the
        # closure would keep a second reference to each), and a dict argument (transformer_options,
        # which the model changes between blocks) as it is now
        args = tuple(None if torch.is_tensor(v) else dict(v) if isinstance(v, dict) else v for v in args)
        kwargs = {k: None if torch.is_tensor(v) else dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        single: list[bool] = []

        def run(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
            copies = [tensor.clone() for tensor in inputs]  # the block may add into its inputs in place
            new_args, new_kwargs = list(args), dict(kwargs)
            for position, copy in zip(positions, copies):
                new_args[position] = copy
            for key, copy in zip(keys, copies[len(positions):]):
                new_kwargs[key] = copy
            output = function(*new_args, **new_kwargs)
            if not single:
                single.append(torch.is_tensor(output))
            return (output,) if torch.is_tensor(output) else tuple(output)

        outputs = _Recomputed.apply(run, replay_factory(), len(tensors), *tensors, *parameters)
        return outputs[0] if single[0] else outputs

    return call


class _Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, replay: Replay, count: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.run, ctx.replay = run, replay
        ctx.save_for_backward(*tensors[:count])  # saving also checks nobody changes them before backward
        ctx.parameters = tensors[count:]
        return run(tensors[:count])

    @staticmethod
    def backward(ctx, *output_gradients: torch.Tensor):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with torch.enable_grad(), ctx.replay():
            outputs = ctx.run(inputs)
        sources = [*inputs, *ctx.parameters]
        wanted = [t for t in sources if t.requires_grad]
        live = [(output, gradient) for output, gradient in zip(outputs, output_gradients)
                if output.requires_grad and gradient is not None]
        found = iter(torch.autograd.grad([o for o, _ in live], wanted, [g for _, g in live], allow_unused=True)
                     if live and wanted else [None] * len(wanted))
        return (None, None, None, *(next(found) if t.requires_grad else None for t in sources))


def _has_nested_gradient(args: tuple, kwargs: dict) -> bool:
    """A tensor that needs a gradient inside a container argument (not a Function input of its own)."""
    def nested(value: Any, top: bool) -> bool:
        if torch.is_tensor(value):
            return value.requires_grad and not top
        if isinstance(value, (list, tuple)):
            return any(nested(v, False) for v in value)
        if isinstance(value, dict):
            return any(nested(v, False) for v in value.values())
        if hasattr(value, "__dataclass_fields__"):
            return any(nested(getattr(value, name), False) for name in value.__dataclass_fields__)
        return False
    return any(nested(v, True) for v in args) or any(nested(v, True) for v in kwargs.values())
