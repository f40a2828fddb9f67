"""The membranes the erasure benchmark measures, trained once with the pack's own SPM Train Membrane code
and kept in a folder: a file's name carries its concept, its variant and a digest of its
settings, so a changed setting trains a new file and a re-run reuses what is there.

usage: python -m lab.membranes --folder DIR [--variants default no_anchoring ...] [--comfyui PATH]
(trains every benchmark concept for the named variants; what the benchmark would do on its first
run, split out so it can start early in the background)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os

from .harness import Lab, MembraneSettings

# Ten concepts erased, from every family. "house" is left out: the anchor strength was chosen on
# it. The four kept concepts are what a stack of all ten must leave intact.
ERASED = ("circle", "triangle", "cross", "red", "blue", "yellow", "snowman", "mushroom", "tree", "striped")
KEPT = ("square", "green", "purple", "house")

VARIANTS = {
    "default": MembraneSettings(),
    "no_anchoring": dataclasses.replace(MembraneSettings(), anchor_strength=0.0, anchor_samples=0),
    "adversarial": dataclasses.replace(MembraneSettings(), adversaries=4, adversary_space="conditioning"),
    "token_adversarial": dataclasses.replace(MembraneSettings(), adversaries=4),
    # the robustness candidate: more capacity and more contexts (README, Robustness: it does not hold)
    "rank4": dataclasses.replace(MembraneSettings(), rank=4, contexts=4),
    # rollouts with CFG on the miniature DiT, which is sampled with CFG (on the UNet world 3 is the default)
    "cfg_rollouts": dataclasses.replace(MembraneSettings(), rollout_cfg=3.0),
    # Flux-class models: the single blocks' text tokens too
    "single_blocks": dataclasses.replace(MembraneSettings(), single_blocks=True),
}


def anchor_variant(surrogates: str, strength: float) -> MembraneSettings:
    """The anchoring sweep: `surrogates` ("prompts" or "gaussian") at anchor strength `strength`."""
    return dataclasses.replace(MembraneSettings(), surrogates=surrogates, anchor_strength=strength)


def settings_digest(settings: MembraneSettings) -> str:
    # a setting added later keeps, when it is not set (None), the names of the membranes trained before it
    text = json.dumps({k: v for k, v in dataclasses.asdict(settings).items() if v is not None}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def membrane(lab: Lab, concept: str, label: str, settings: MembraneSettings) -> str:
    """The file name (in the lab's spm folder) of `concept`'s membrane trained with `settings`."""
    world = "" if lab.world == "unet" else f"{lab.world}-"  # the UNet world's files keep their names
    name = f"{world}{concept}-{label}-{settings_digest(settings)}"
    if os.path.exists(os.path.join(lab.membrane_dir, f"{name}.safetensors")):
        return f"{name}.safetensors"
    return lab.train_membrane(name, [concept], settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", required=True, help="where the membranes are kept")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--concepts", nargs="+", default=list(ERASED))
    parser.add_argument("--comfyui", default=None)
    options = parser.parse_args()
    lab = Lab(options.comfyui, membrane_dir=options.folder)
    for label in options.variants:
        for concept in options.concepts:
            print(concept, label, membrane(lab, concept, label, VARIANTS[label]), flush=True)


if __name__ == "__main__":
    main()
