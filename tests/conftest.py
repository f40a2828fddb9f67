"""Puts a real ComfyUI host (installed by scripts/install_host.sh) on the import path (lab/host.py).

COMFYUI_ROOT selects the host tree; default ~/.cache/spm-comfy-host/ComfyUI. The tests in
tests/engine check spm_core alone and run without a host (torch, safetensors and pytest suffice:
`python -m pytest tests/engine`); every other test needs it.
"""

import os
import pathlib
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
ENGINE = os.path.join(TESTS, "engine")
for path in (TESTS, REPO):  # the tests' helpers, and lab.host to find the host
    if path not in sys.path:
        sys.path.insert(0, path)

from lab.host import host_root, is_host, use_host  # noqa: E402

COMFYUI_ROOT = host_root()
HOST = is_host(COMFYUI_ROOT)
if HOST:
    use_host(COMFYUI_ROOT)  # before comfy.model_management is imported: this torch has no CUDA

import torch  # noqa: E402


class _RootAsFolder:
    """pytest collects from the repository root, which would make it a package and import its
    `__init__.py`: the pack, which needs ComfyUI. The tests load the pack themselves (tests/pack.py),
    so the root is collected as a plain folder."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path: pathlib.Path, parent: pytest.Collector) -> pytest.Collector | None:
        return pytest.Dir.from_parent(parent, path=path) if path == pathlib.Path(REPO) else None


def pytest_configure(config: pytest.Config) -> None:
    """Without a host, only tests/engine may run: anything else stops here with what to do."""
    config.pluginmanager.register(_RootAsFolder())
    if HOST:
        return
    paths = [os.path.abspath(os.path.join(config.invocation_params.dir, arg.split("::")[0])) for arg in config.args]
    outside = [path for path in paths if os.path.commonpath([path, ENGINE]) != ENGINE]
    if outside:
        raise pytest.UsageError(f"no ComfyUI host at {COMFYUI_ROOT}: run scripts/install_host.sh (or set COMFYUI_ROOT); "
                                f"without it only the engine tests run: python -m pytest {os.path.relpath(ENGINE)}")


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

    from lab.comfy_server import ComfyServer
    from lab.tiny_assets import install_assets

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
