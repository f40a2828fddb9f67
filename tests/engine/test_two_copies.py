"""ComfyUI imports spm_core as `<pack folder>.spm_core`, scripts as `spm_core`: two copies of the same
modules in one process. Neither copy keeps state the other would need: a stack made through one is
gated through it whichever copy installed its hooks."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch

import spm_core
from spm_core import stack as script_stack

FOLDERS = ("ComfyUI-SPM", "comfyui-spm", "comfyui_spm")  # a git clone, the registry, this test suite


@pytest.fixture(params=FOLDERS)
def pack_copy(request, tmp_path):
    """spm_core's `stack` module imported a second time, as ComfyUI's loader names it in a pack folder
    (the folder's path, dots written `_x_`, then `.spm_core`); taken out of sys.modules afterwards."""
    package = f"{tmp_path}/{request.param}".replace(".", "_x_") + ".spm_core"
    folder = os.path.dirname(spm_core.__file__)
    spec = importlib.util.spec_from_file_location(package, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    sys.modules[package] = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(sys.modules[package])
        yield importlib.import_module(f"{package}.stack")
    finally:
        for name in [name for name in sys.modules if name == package or name.startswith(package + ".")]:
            del sys.modules[name]


@pytest.mark.parametrize("law", ["LINEAR", "OFFICIAL_MERGE"])
def test_a_stack_made_by_either_copy_is_gated_through_hooks_of_the_other(pack_copy, law):
    assert pack_copy is not script_stack and pack_copy.MembraneStack is not script_stack.MembraneStack
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    x = torch.randn(3, 6, generator=generator)
    bare = model(x)
    for made_by, hooked_by in ((script_stack, pack_copy), (pack_copy, script_stack)):
        layer = made_by.LayerWeights(torch.randn(1, 6, generator=generator), torch.randn(5, 1, generator=generator), 1.0)
        membrane = made_by.Membrane(name="m", concepts=(), layers={"lora_unet_x": layer}, architecture="sd1")
        stack = made_by.MembraneStack([made_by.MembraneUse(membrane)], {"lora_unet_x": "0"},
                                      {"0": made_by.module_shape(model[0])}, getattr(made_by.GateLaw, law))
        hooks = hooked_by.InstalledHooks(stack)
        hooks.install({"0": model[0]})
        try:
            assert torch.equal(model(x), bare), "no gates open: the model is as it was"
            with stack.gates_active(torch.tensor([[1.0], [0.0], [1.0]])):
                out = model(x)
                assert torch.equal(stack.current_row_gates(), torch.tensor([[1.0], [0.0], [1.0]]))
            torch.testing.assert_close(out[[0, 2]], (bare + x @ layer.delta_weight().T)[[0, 2]])
            assert torch.equal(out[1], bare[1]), "a closed row stays as it was"
            assert stack.current_row_gates() is None and torch.equal(model(x), bare)
        finally:
            hooks.remove()
