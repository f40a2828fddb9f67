"""Loads this pack the way ComfyUI does (nodes.load_custom_node) under a fixed package name."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "comfyui_spm"


def load_pack():
    """The pack's package module, imported once through ComfyUI's own custom-node loader."""
    global _package_name
    if _package_name is None:
        import nodes

        link = os.path.join(tempfile.mkdtemp(prefix="spm_pack_"), PACKAGE)
        os.symlink(REPO, link)
        if not asyncio.run(nodes.load_custom_node(link)):
            raise RuntimeError("ComfyUI failed to import the pack; see the log above")
        _package_name = link.replace(".", "_x_")  # the module name ComfyUI's loader gives a folder
    return sys.modules[_package_name]


def pack_module(name: str):
    """A submodule of the loaded pack, e.g. pack_module("nodes.runtime")."""
    return importlib.import_module(f"{load_pack().__name__}.{name}")


_package_name: str | None = None
