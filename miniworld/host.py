"""Puts the ComfyUI host (scripts/install_host.sh) on the import path for the miniworld scripts."""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_HOST = os.path.join(os.path.expanduser("~"), ".cache", "spm-comfy-host", "ComfyUI")


def use_host(comfy_root: str | None = None) -> str:
    root = os.path.abspath(comfy_root or os.environ.get("COMFYUI_ROOT", DEFAULT_HOST))
    if not os.path.isfile(os.path.join(root, "comfy", "model_patcher.py")):
        raise SystemExit(f"no ComfyUI host at {root}: run scripts/install_host.sh (or set COMFYUI_ROOT)")
    for path in (REPO, root):  # ComfyUI's root first: its `nodes` module must win over the pack's
        if path not in sys.path:
            sys.path.insert(0, path)
    from comfy.cli_args import args

    args.cpu = True
    return root
