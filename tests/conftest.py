"""Puts a real ComfyUI host (installed by scripts/install_host.sh) on the import path.

COMFYUI_ROOT selects the host tree; default ~/.cache/spm-comfy-host/ComfyUI.
"""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI_ROOT = os.path.abspath(os.environ.get(
    "COMFYUI_ROOT", os.path.join(os.path.expanduser("~"), ".cache", "spm-comfy-host", "ComfyUI")))
if not os.path.isfile(os.path.join(COMFYUI_ROOT, "comfy", "model_patcher.py")):
    raise RuntimeError(f"no ComfyUI host at {COMFYUI_ROOT}: run scripts/install_host.sh (or set COMFYUI_ROOT)")
# ComfyUI's root goes first: its top-level `nodes` module must win over this pack's `nodes/`.
for path in (os.path.dirname(os.path.abspath(__file__)), REPO, COMFYUI_ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)

from comfy.cli_args import args  # noqa: E402

args.cpu = True  # before comfy.model_management is imported: this torch has no CUDA

import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():  # as ComfyUI's executor runs nodes
        yield


@pytest.fixture(scope="module")
def sd1():
    """Tiny SD1.x UNet with the real SD1 cross-attention width (768), so shapes say 'sd1' (file_helpers.TinyModel)."""
    from file_helpers import TinyModel

    return TinyModel("sd1", context=768)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A real ComfyUI server (main.py --cpu) with this pack in custom_nodes, the tiny SD1.5
    checkpoint, three membranes and the broken membrane files of membrane_helpers in models/spm."""
    from membrane_helpers import write_broken_membranes

    from scripts.comfy_server import ComfyServer
    from scripts.tiny_assets import install_assets

    base = tmp_path_factory.mktemp("comfy_base")
    install_assets(str(base / "models"))
    write_broken_membranes(str(base / "models" / "spm"))
    with ComfyServer(COMFYUI_ROOT, str(base)) as server:
        yield server


@pytest.fixture(scope="session")
def spm_world(tmp_path_factory):
    """A tiny SD1 model and CLIP, membranes snoopy / mickey_mouse / van_gogh in a models/spm folder,
    and the pack loaded through ComfyUI's own loader."""
    import folder_paths
    from membrane_helpers import key_map_of, modules_of, random_membrane
    from pack import load_pack
    from tiny_models import build_clip, build_patcher

    from spm_core.concepts import Concept
    from spm_core.file_format import save_membrane

    load_pack()
    folder = tmp_path_factory.mktemp("spm_models")
    folder_paths.add_model_folder_path("spm", str(folder), is_default=True)
    with torch.no_grad():
        patcher, clip = build_patcher("sd1", seed=7), build_clip("sd1", seed=8)
        key_map = key_map_of(patcher)
        modules = modules_of(patcher, key_map)
        for seed, target in ((1, "snoopy"), (2, "mickey mouse"), (3, "van gogh")):
            membrane = random_membrane(key_map, modules, seed=seed, target=target, std=0.15)
            membrane.concepts = (Concept(target),)
            save_membrane(str(folder / f"{target.replace(' ', '_')}.safetensors"), membrane)
    return patcher, clip, folder
