"""The fused stack on a ComfyUI UNet: gate 0 is the bare model bit for bit, gate 1 is ComfyUI's own
LoRA patching, gates are per row, and hooks come and go without a trace."""

import pytest
import torch
from membrane_helpers import key_map_of, modules_of, random_membrane, shapes_of
from tiny_models import build_patcher

from spm_core.file_format import load_membrane, save_membrane
from spm_core.stack import InstalledHooks, MembraneStack, MembraneUse


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def world(request):
    arch = request.param
    patcher = build_patcher(arch, seed=5)
    key_map = key_map_of(patcher)
    modules = modules_of(patcher, key_map)
    membranes = [random_membrane(key_map, modules, seed=s, std=0.1) for s in (1, 2)]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=generator)
    extra = {"y": torch.randn(4, patcher.model.model_config.unet_config["adm_in_channels"], generator=generator)} if arch == "sdxl" else {}
    inputs = (x, torch.full((4,), 300.0), torch.randn(4, 77, 32, generator=generator), extra)
    return patcher, key_map, modules, membranes, inputs


def eps(patcher, inputs):
    x, t, context, extra = inputs
    return patcher.model.diffusion_model(x, t, context=context, **extra)


def hooked(world, gates, uses=None):
    patcher, key_map, modules, membranes, inputs = world
    stack = MembraneStack(uses or [MembraneUse(m) for m in membranes], key_map, shapes_of(modules))
    hooks = InstalledHooks(stack)
    hooks.install(modules)
    try:
        with stack.gates_active(torch.as_tensor(gates, dtype=torch.float32)):
            return eps(patcher, inputs)
    finally:
        hooks.remove()


def test_gate_zero_is_bit_identical_to_bare_model(world):
    bare = eps(world[0], world[4])
    assert torch.equal(hooked(world, [[0.0, 0.0]] * 4), bare)


def test_gate_one_equals_comfyui_lora_patching(world, tmp_path):
    import comfy.sd

    patcher, _, _, membranes, inputs = world
    path = tmp_path / "membrane.safetensors"
    save_membrane(str(path), membranes[0])
    import safetensors.torch
    lora = safetensors.torch.load_file(str(path))
    lora_patcher, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    lora_patcher.patch_model()
    try:
        merged = eps(lora_patcher, inputs)
    finally:
        lora_patcher.unpatch_model()
    ours = hooked(world, [[1.0, 0.0]] * 4, uses=[MembraneUse(load_membrane(str(path))), MembraneUse(membranes[1])])
    assert not torch.equal(merged, eps(patcher, inputs))
    assert (ours - merged).abs().max() <= 1e-5


def test_gates_apply_per_row(world):
    """Rows 0-1 open membrane 0, row 2 nothing, row 3 both: each row equals its own run."""
    gates = [[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.7, 0.4]]
    together = hooked(world, gates)
    bare = eps(world[0], world[4])
    assert torch.equal(together[2], bare[2])
    for row in (0, 1, 3):
        alone = hooked(world, [gates[row]] * 4)
        assert (together[row] - alone[row]).abs().max() <= 1e-5
        assert (together[row] - bare[row]).abs().max() > 1e-3


def test_strength_is_linear_in_the_gate(world):
    bare = eps(world[0], world[4])
    full = hooked(world, [[1.0, 0.0]] * 4) - bare
    half_by_strength = hooked(world, [[1.0, 0.0]] * 4, uses=[MembraneUse(world[3][0], 0.5), MembraneUse(world[3][1])]) - bare
    half_by_gate = hooked(world, [[0.5, 0.0]] * 4) - bare
    # the output is not linear in the branch, so compare the two halves with each other, and the
    # first-order size against the full effect
    assert (half_by_strength - half_by_gate).abs().max() <= 1e-5
    ratio = half_by_gate.norm() / full.norm()
    assert 0.35 < ratio < 0.65


def test_hooks_without_active_gates_do_nothing_and_leave_no_trace(world):
    patcher, key_map, modules, membranes, inputs = world
    bare = eps(patcher, inputs)
    stack = MembraneStack([MembraneUse(m) for m in membranes], key_map, shapes_of(modules))
    hooks = InstalledHooks(stack)
    hooks.install(modules)
    hooks.install(modules)  # idempotent: still one hook per module
    assert all(len(m._forward_hooks) == 1 for m in modules.values())
    try:
        assert torch.equal(eps(patcher, inputs), bare), "a stack with no gate context must not act"
        other = MembraneStack([MembraneUse(membranes[0])], key_map, shapes_of(modules))
        with other.gates_active(torch.ones(4, 1)):
            assert torch.equal(eps(patcher, inputs), bare), "another stack's gates must not open this one"
    finally:
        hooks.remove()
        hooks.remove()  # idempotent
    assert all(len(m._forward_hooks) == 0 for m in modules.values())


def test_gate_rows_are_repeated_over_a_larger_batch(world):
    stacked = hooked(world, [[1.0, 0.0], [0.0, 0.0]])
    expanded = hooked(world, [[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    assert torch.equal(stacked, expanded)


def test_gate_matrix_of_the_wrong_width_is_refused(world):
    patcher, key_map, modules, membranes, _ = world
    stack = MembraneStack([MembraneUse(m) for m in membranes], key_map, shapes_of(modules))
    with pytest.raises(ValueError, match=r"gates must be \(rows, 2\)"):
        with stack.gates_active(torch.ones(4, 3)):
            pass
