"""Loads this pack the way ComfyUI does (nodes.load_custom_node) and runs its nodes in-process,
as ComfyUI's executor would."""

from __future__ import annotations

import torch

from lab.pack_loader import load_pack, pack_module  # noqa: F401 (the tests import them from here)


def node(name, unique_id="1"):
    """The node class prepared with its hidden inputs, as the executor prepares it."""
    from comfy_api.latest import io

    import nodes

    return nodes.NODE_CLASS_MAPPINGS[name].PREPARE_CLASS_CLONE({io.Hidden.unique_id: unique_id})


def load_spm(model, clip, membrane, transport="calibrated", rows="positive only", strength=1.0, start=0.0, end=1.0, uid="1",
             min_gate=0.0, negative_strength=None, ramp=None):
    optional = {name: value for name, value in (("negative_strength", negative_strength), ("ramp", ramp)) if value is not None}
    return node("SPMLoader", uid).execute(model=model, clip=clip, membrane=membrane, strength=strength, transport=transport,
                                          rows=rows, start_percent=start, end_percent=end, min_gate=min_gate,
                                          **optional).result[0]


def encode(clip, text):
    return node("SPMTextEncode").execute(clip, text).result[0]


def sample(model, positive, negative, seed=3, steps=3, batch=1) -> torch.Tensor:
    import nodes

    (latent,) = nodes.EmptyLatentImage().generate(64, 64, batch)
    (out,) = nodes.KSampler().sample(model, seed, steps, 6.0, "euler", "normal", positive, negative, latent)
    return out["samples"]
