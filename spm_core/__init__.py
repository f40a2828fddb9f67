"""spm_core: the concept-SemiPermeable Membrane engine, free of any ComfyUI import.

file_format  read/write/validate membrane files
membrane     one membrane's weights and the fused per-layer math
stack        binding membranes to a model, gate context and forward hooks
transport    Facilitated Transport gates from conditioning
training     Latent Anchoring training against a small model protocol

One identity: ComfyUI imports this folder as part of the pack (`<pack>.spm_core`), scripts as
`spm_core`. Two copies of the same code would keep two gate contexts (hooks installed through one
copy never see gates set through the other) and two sets of exception classes, so the first
import makes `spm_core` the canonical name and the pack's names point at the same modules.
"""

import importlib
import os
import pkgutil
import sys


def _one_identity() -> None:
    here = os.path.realpath(os.path.dirname(__file__))
    canonical = sys.modules.setdefault("spm_core", sys.modules[__name__])
    if os.path.realpath(os.path.dirname(canonical.__file__)) != here:
        return  # another copy of spm_core, from another folder: nothing to share with it
    for info in pkgutil.iter_modules([here]):
        sys.modules[f"{__name__}.{info.name}"] = importlib.import_module(f"spm_core.{info.name}")
    sys.modules[__name__] = canonical


if __name__ != "spm_core":
    _one_identity()
