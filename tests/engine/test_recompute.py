"""spm_core.recompute on its own: a block that adds into its input in place (as ComfyUI's Flux
blocks do), with a trained branch switched by a flag the caller turns off before backward."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch

from spm_core.recompute import recomputed


@pytest.fixture(autouse=True)
def gradients():
    with torch.enable_grad():  # the suite turns them off, as ComfyUI samples
        yield


def copies():
    """What the trainer does on Flux: a copy of every activation autograd saves, since the block then adds into it."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t if t.is_leaf else t.clone(), lambda t: t)


class Block(torch.nn.Module):
    """x += mlp(x) + branch(x), the branch on while `switch.on`; returns (x, a second output)."""

    def __init__(self, switch: dict, branch: torch.Tensor) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
        self.switch, self.branch = switch, branch
        for p in self.mlp.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, scale: torch.Tensor, options: dict) -> tuple[torch.Tensor, torch.Tensor]:
        update = self.mlp(x) * scale
        if self.switch["on"]:
            update = update + x @ self.branch
        options["calls"] = options.get("calls", 0) + 1  # the model changes its options dict between blocks
        x += update
        return x, update.sum(-1)


def run_blocks(checkpointing: bool, seed: int = 0):
    torch.manual_seed(seed)
    switch = {"on": False}
    branch = torch.nn.Parameter(torch.randn(8, 8) * 0.1)
    blocks = [Block(switch, branch) for _ in range(3)]

    def replay_factory():
        state = switch["on"]

        @contextlib.contextmanager
        def replay():
            before, switch["on"] = switch["on"], state
            try:
                with copies():
                    yield
            finally:
                switch["on"] = before
        return replay
    calls = [recomputed(b.forward, [branch], replay_factory) if checkpointing else b.forward for b in blocks]
    x = torch.randn(2, 5, 8) @ branch  # the stream needs a gradient from the start, as Flux's text does after txt_in
    scale = torch.tensor(1.5)
    options: dict = {}
    switch["on"] = True
    side = []
    with copies():
        for call in calls:
            x, extra = call(x, scale, options)
            side.append(extra)
    switch["on"] = False  # the trainer switches the branch off before backward
    loss = (x ** 2).mean() + torch.stack(side).pow(2).mean()
    (gradient,) = torch.autograd.grad(loss, [branch])
    return loss.detach(), gradient


def test_recomputed_blocks_give_the_plain_loss_and_gradient():
    plain_loss, plain_gradient = run_blocks(checkpointing=False)
    loss, gradient = run_blocks(checkpointing=True)
    assert torch.equal(loss, plain_loss)
    assert plain_gradient.abs().max() > 0
    assert torch.allclose(gradient, plain_gradient, rtol=1e-6, atol=1e-8)


def test_without_the_replay_the_recomputation_would_differ():
    """The test above can fail: a recomputation that sees the switch as it is at backward time (off)
    gives another gradient than the plain pass."""
    def gradient(wrap) -> torch.Tensor:
        torch.manual_seed(0)
        switch = {"on": False}
        branch = torch.nn.Parameter(torch.randn(8, 8) * 0.1)
        block = Block(switch, branch)
        x = torch.randn(2, 5, 8) @ branch
        switch["on"] = True
        with copies():
            out, _ = wrap(block, branch)(x, torch.tensor(1.0), {})
        switch["on"] = False
        return torch.autograd.grad(out.pow(2).mean(), [branch])[0]

    plain = gradient(lambda block, branch: block.forward)
    without_replay = gradient(lambda block, branch: recomputed(block.forward, [branch], lambda: copies))
    assert not torch.allclose(without_replay, plain, rtol=1e-3)


@dataclass
class Modulation:
    shift: torch.Tensor


def test_a_gradient_inside_a_container_argument_is_not_dropped():
    """A tensor needing a gradient inside a dataclass (Flux passes its modulation so) cannot be a
    Function input: the block then runs as it is, and its gradient still arrives."""
    shift = torch.nn.Parameter(torch.ones(8))

    def block(x: torch.Tensor, modulation: Modulation) -> torch.Tensor:
        return x * 2 + modulation.shift

    call = recomputed(block, [], lambda: contextlib.nullcontext)
    out = call(torch.randn(3, 8, requires_grad=True), Modulation(shift))
    (gradient,) = torch.autograd.grad(out.sum(), [shift])
    assert torch.equal(gradient, torch.full((8,), 3.0))


def test_an_input_changed_after_the_forward_is_refused_in_backward():
    """The inputs are saved for the recomputation: changing one in place before backward would
    recompute something else, and autograd says so."""
    def block(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x)

    weight = torch.nn.Parameter(torch.ones(4))
    x = torch.randn(4) * weight
    out = recomputed(block, [weight], lambda: contextlib.nullcontext)(x)
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out.sum(), [weight])


def test_only_the_saved_copy_of_an_input_is_kept():
    """Under the trainer's copies on Flux, what the recomputation keeps of an input is its saved copy:
    no second reference keeps the input itself alive until backward."""
    import weakref

    weight = torch.nn.Parameter(torch.ones(4))
    call = recomputed(torch.sin, [weight], lambda: copies)
    with copies():
        x = torch.randn(4) * weight
        out = call(x)
    alive = weakref.ref(x)
    del x
    assert alive() is None
    (gradient,) = torch.autograd.grad(out.sum(), [weight])
    assert gradient.abs().sum() > 0
