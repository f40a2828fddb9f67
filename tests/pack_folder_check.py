"""Run by tests/test_nodes_inprocess.py in a fresh process: `python pack_folder_check.py FOLDER WORK`.

A script imports `spm_core` itself, then ComfyUI loads the pack from a folder named FOLDER (in WORK),
so the process holds two copies of spm_core: the script's and `<pack>.spm_core`. A membrane applied
through the pack's SPM Load Membrane must still gate every row of the sampler's calls as it should.
Exits with an AssertionError when it does not. COMFYUI_ROOT names the host tree.
"""

from __future__ import annotations

import asyncio
import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def main(folder: str, work: str) -> None:
    sys.path[:0] = [REPO, TESTS]  # lab.host (which puts the host first) and the tests' helpers
    from lab.host import use_host

    use_host()
    import folder_paths
    import torch
    from comfy.patcher_extension import WrappersMP
    from membrane_helpers import key_map_of, modules_of, random_membrane
    from pack import encode, load_spm, sample
    from tiny_models import build_clip, build_patcher

    import nodes
    import spm_core.stack as script_stack  # the script's own copy (ComfyUI loads the pack below)
    from spm_core.file_format import save_membrane

    link = os.path.join(work, folder)
    os.symlink(REPO, link)
    assert asyncio.run(nodes.load_custom_node(link)), "ComfyUI failed to import the pack"
    pack = link.replace(".", "_x_")  # the module name ComfyUI's loader gives a folder
    assert sys.modules[f"{pack}.spm_core.stack"] is not script_stack, "the process should hold two copies of spm_core"
    models = os.path.join(work, "spm")
    os.makedirs(models)
    folder_paths.add_model_folder_path("spm", models, is_default=True)

    calls = []

    def spy(executor, *args, **kwargs):
        gates = stack.current_row_gates()
        out = executor(*args, **kwargs)
        with stack.gates_active(torch.zeros(1, stack.membrane_count)):
            bare = executor(*args, **kwargs)
        kinds = list((kwargs.get("transformer_options") or args[5])["cond_or_uncond"])
        calls.append((gates, kinds, out, bare))
        return out

    with torch.no_grad():
        patcher, clip = build_patcher("sd1", seed=7), build_clip("sd1", seed=8)
        key_map = key_map_of(patcher)
        save_membrane(os.path.join(models, "snoopy.safetensors"),
                      random_membrane(key_map, modules_of(patcher, key_map), seed=1, target="snoopy", std=0.15))
        model = load_spm(patcher, clip, "snoopy.safetensors", transport="always_open").clone()
        stack = model.get_attachment(sys.modules[f"{pack}.nodes.runtime"].KEY).stack
        model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "pack_folder_check", spy)
        sample(model, encode(clip, "snoopy"), encode(clip, ""), steps=2)

    assert calls, "the sampler never called the model"
    for gates, kinds, out, bare in calls:
        rows = out.shape[0] // len(kinds)
        for chunk, kind in enumerate(kinds):
            part = slice(chunk * rows, (chunk + 1) * rows)
            if kind == 0:  # the positive rows: the membrane fully open, and acting
                assert torch.equal(gates[part], torch.ones(rows, 1)), gates
                assert not torch.equal(out[part], bare[part]), "the membrane did nothing on a positive row"
            else:  # the negative rows ("positive only"): closed, bit-identical to the bare model
                assert torch.equal(gates[part], torch.zeros(rows, 1)), gates
                assert torch.equal(out[part], bare[part]), "the membrane acted on a negative row"


if __name__ == "__main__":
    main(*sys.argv[1:])
