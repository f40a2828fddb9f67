"""Fast paths give the plain path's numbers: the static-gate fold (membranes folded into a copy
of the weights) gives the hooked model's output without touching the base weights; closed rows
skipped by the hooks stay bit-identical (the fused layer's in-place accumulation:
tests/engine/test_fused_layer.py)."""

import pytest
import torch
from membrane_helpers import key_map_of, modules_of, random_membrane, shapes_of
from tiny_models import build_patcher

from spm_core.membrane import GateLaw
from spm_core.stack import InstalledHooks, MembraneStack, MembraneUse


@pytest.fixture(scope="module", params=["sd1", "sd2"])  # sd1: 1x1-conv proj_in/out; sd2: Linear
def world(request):
    patcher = build_patcher(request.param, seed=7)
    key_map = key_map_of(patcher)
    modules = modules_of(patcher, key_map)
    membranes = [random_membrane(key_map, modules, seed=s, std=0.1) for s in (3, 4)]
    generator = torch.Generator().manual_seed(2)
    inputs = (torch.randn(2, 4, 8, 8, generator=generator), torch.full((2,), 300.0), torch.randn(2, 77, 32, generator=generator))
    return patcher, key_map, modules, membranes, inputs


def eps(patcher, inputs):
    x, t, context = inputs
    return patcher.model.diffusion_model(x, t, context=context)


@pytest.mark.parametrize("law", [GateLaw.LINEAR, GateLaw.PAPER_SQUARED])
def test_folded_weights_forward_equals_hooked_forward(world, law):
    patcher, key_map, modules, membranes, inputs = world
    stack = MembraneStack([MembraneUse(membranes[0], 0.8), MembraneUse(membranes[1], 0.5)], key_map, shapes_of(modules), law)
    gates = torch.tensor([0.7, 0.4])
    hooks = InstalledHooks(stack)
    hooks.install(modules)
    try:
        with stack.gates_active(gates.expand(2, -1)):
            hooked = eps(patcher, inputs)
    finally:
        hooks.remove()

    originals = {key: modules[key].weight for key in stack.layers}
    copies = {key: weight.detach().clone() for key, weight in originals.items()}
    folded = stack.folded_weights(originals, gates)
    assert folded.keys() == originals.keys()
    for key, weight in folded.items():
        assert weight.shape == originals[key].shape and weight.dtype == originals[key].dtype
        assert weight.data_ptr() != originals[key].data_ptr()
        assert torch.equal(originals[key], copies[key]), f"folding modified the base weight of {key}"

    try:
        for key, weight in folded.items():
            modules[key].weight = torch.nn.Parameter(weight, requires_grad=False)
        fast = eps(patcher, inputs)
    finally:
        for key, weight in originals.items():
            modules[key].weight = weight
    assert not torch.equal(fast, eps(patcher, inputs))
    assert (fast - hooked).abs().max() <= 1e-5


def test_closed_trailing_rows_are_skipped_and_stay_bit_identical(world):
    """An uncond chunk at gate 0 after an open cond chunk: the hooks work on the open rows only."""
    patcher, key_map, modules, membranes, inputs = world
    stack = MembraneStack([MembraneUse(m) for m in membranes], key_map, shapes_of(modules))
    hooks = InstalledHooks(stack)
    hooks.install(modules)
    try:
        with stack.gates_active(torch.tensor([[0.7, 0.4], [0.0, 0.0]])):
            mixed = eps(patcher, inputs)
        with stack.gates_active(torch.tensor([[0.7, 0.4], [0.7, 0.4]])):
            both_open = eps(patcher, inputs)
    finally:
        hooks.remove()
    assert torch.equal(mixed[1], eps(patcher, inputs)[1])
    assert (mixed[0] - both_open[0]).abs().max() <= 1e-5


def test_folded_weights_need_one_gate_per_membrane(world):
    _, key_map, modules, membranes, _ = world
    stack = MembraneStack([MembraneUse(m) for m in membranes], key_map, shapes_of(modules))
    with pytest.raises(ValueError, match=r"gates must be \(2,\)"):
        stack.folded_weights({key: modules[key].weight for key in stack.layers}, torch.ones(2, 2))
