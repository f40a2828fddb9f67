"""The ComfyUI host that the scripts, the lab and the tests run on (installed by
scripts/install_host.sh): where it is, and how it and this repository go on the import path.

COMFYUI_ROOT (or a script's --comfyui) selects the host tree; default ~/.cache/spm-comfy-host/ComfyUI.
"""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_HOST = os.path.join(os.path.expanduser("~"), ".cache", "spm-comfy-host", "ComfyUI")


def host_root(comfy_root: str | None = None) -> str:
    """The host tree: `comfy_root`, else COMFYUI_ROOT, else the default host."""
    return os.path.abspath(comfy_root or os.environ.get("COMFYUI_ROOT", DEFAULT_HOST))


def is_host(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "comfy", "model_patcher.py"))


def put_on_path(root: str) -> None:
    """ComfyUI's root first and this repository last: ComfyUI's top-level `nodes` module must win
    over the pack's `nodes/` package, while `spm_core`, `miniworld` and `lab` stay importable."""
    if root not in sys.path:
        sys.path.insert(0, root)
    if REPO not in sys.path:
        sys.path.append(REPO)


def use_host(comfy_root: str | None = None, cpu: bool = True) -> str:
    """Puts the host on the import path and sets its `--cpu` flag (before comfy.model_management
    is imported, which reads it once); returns the host tree."""
    root = host_root(comfy_root)
    if not is_host(root):
        raise SystemExit(f"no ComfyUI host at {root}: run scripts/install_host.sh (or set COMFYUI_ROOT)")
    put_on_path(root)
    from comfy.cli_args import args

    args.cpu = cpu
    return root
