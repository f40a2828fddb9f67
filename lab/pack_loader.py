"""Imports this pack the way ComfyUI does (nodes.load_custom_node), for scripts and tests that
drive its nodes in-process. The pack's modules use relative imports, so they need a package."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import tempfile
from types import ModuleType

from .host import REPO

PACKAGE = "comfyui_spm"
_package_name: str | None = None


def load_pack() -> ModuleType:
    """The pack's package module, imported once through ComfyUI's own custom-node loader
    (ComfyUI must be importable and its comfy.cli_args set up first)."""
    global _package_name
    if _package_name is None:
        import nodes

        link = os.path.join(tempfile.mkdtemp(prefix="spm_pack_"), PACKAGE)
        os.symlink(REPO, link)
        if not asyncio.run(nodes.load_custom_node(link)):
            raise RuntimeError("ComfyUI failed to import the SPM pack; see the log above")
        _package_name = link.replace(".", "_x_")  # the module name ComfyUI's loader gives a folder
    return sys.modules[_package_name]


def pack_module(name: str) -> ModuleType:
    """A submodule of the loaded pack, e.g. pack_module("nodes.runtime")."""
    return importlib.import_module(f"{load_pack().__name__}.{name}")
