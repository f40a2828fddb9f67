"""Train a membrane headless, e.g. on a remote GPU: the same training as the SPM Train Membrane node.

usage: python scripts/train_spm.py CHECKPOINT.safetensors --target "snoopy" [--config train.yaml]
           [--surrogate "a dog"] [--neutral ""] [--out models/spm/snoopy.safetensors] [--resume]
           [--comfyui PATH/TO/ComfyUI] [--clip-skip N]
       python scripts/train_spm.py flux1-dev.safetensors --text-encoder clip_l.safetensors
           --text-encoder t5xxl_fp16.safetensors --target "snoopy" ...
A checkpoint with its text encoder is loaded as CheckpointLoaderSimple loads it (SD1.x / SD2.x /
SDXL, or an all-in-one Flux.1 checkpoint such as flux1-dev-fp8.safetensors); with --text-encoder
the first file is a diffusion model alone, loaded as UNETLoader loads it, and the text encoders as
DualCLIPLoader loads them (--text-encoder-type: flux by default; chroma takes one T5 file).
The config (YAML or JSON) holds spm_core.training.TrainingConfig fields, e.g.
    iterations: 3000
    learning_rate: 1.0e-4
    anchor_strength: 1000
    latent_sizes: [64]
Command-line flags --iterations / --lr / --seed override it. Ctrl-C stops cleanly and leaves
<out>.partial.safetensors, which --resume continues.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository, for lab
from lab.host import host_root, use_host  # noqa: E402


def config_keys() -> str:
    """Every key a --config file takes, with its default and its description (written once, on
    TrainingConfig, where the node's tooltips come from too)."""
    import dataclasses

    from spm_core.training import TrainingConfig

    defaults = TrainingConfig()
    return "config keys (--config):\n" + "\n".join(
        f"  {field.name} (default {getattr(defaults, field.name)}): {field.metadata['help']}"
        for field in dataclasses.fields(TrainingConfig))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=config_keys(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="SD1.x / SD2.x / SDXL / Flux.1 checkpoint, or with --text-encoder a diffusion "
                                           "model file (Flux.1, Chroma)")
    parser.add_argument("--text-encoder", action="append", default=[],
                        help="text encoder file for a diffusion model file (repeat: Flux.1 takes clip_l and t5xxl)")
    parser.add_argument("--text-encoder-type", default="flux",
                        help="how the text encoders are read, as DualCLIPLoader's type (flux, chroma, ...)")
    parser.add_argument("--target", action="append", required=True, help="concept to erase (repeat for several)")
    parser.add_argument("--surrogate", action="append", default=[], help="edit: what the target becomes")
    parser.add_argument("--neutral", default="", help="neutral prompt (default: empty)")
    parser.add_argument("--config", help="YAML or JSON file with training settings")
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", help="output file (default: ./<first target>.safetensors)")
    parser.add_argument("--resume", action="store_true", help="continue <out>.partial.safetensors")
    parser.add_argument("--overwrite", action="store_true", help="replace <out> if it exists")
    parser.add_argument("--clip-skip", type=int, default=0, help="use the text encoder's N-th last layer (like CLIPSetLastLayer -N)")
    parser.add_argument("--comfyui", default=host_root(), help="ComfyUI folder")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU")
    return parser.parse_args(argv)


def read_config(path: str | None) -> dict:
    if not path:
        return {}
    with open(path, encoding="utf-8") as handle:
        if path.endswith((".yaml", ".yml")):
            import yaml

            return yaml.safe_load(handle) or {}
        return json.load(handle)


def main(argv: list[str]) -> None:
    options = parse_args(argv)
    use_host(options.comfyui, cpu=options.cpu or not _has_accelerator())
    import importlib

    import torch

    from lab.pack_loader import load_pack

    package = load_pack().__name__
    training = importlib.import_module(f"{package}.nodes.training")
    TrainingConfig = importlib.import_module(f"{package}.spm_core.training").TrainingConfig
    values = read_config(options.config)
    for key, value in (("iterations", options.iterations), ("learning_rate", options.lr), ("seed", options.seed)):
        if value is not None:
            values[key] = value
    config = TrainingConfig(**values).check()
    out = os.path.abspath(options.out or f"{options.target[0].replace(' ', '_')}.safetensors")
    model, clip = load_models(options)
    if options.clip_skip:
        clip = clip.clone()
        clip.clip_layer(-options.clip_skip)
    request = training.TrainingRequest(options.target, options.surrogate, options.neutral, config, out, options.resume,
                                        options.overwrite)
    started = time.monotonic()

    def report(step) -> None:
        done = step.iteration + 1
        if done % max(1, config.iterations // 50) == 0 or done == config.iterations:
            eta = (time.monotonic() - started) / done * (config.iterations - done)
            print(f"{done}/{config.iterations} loss {step.loss:.5g} (erase {step.erase_loss:.4g}, anchor "
                  f"{step.anchor_loss:.4g}) lr {step.learning_rate:.3g} ETA {eta:.0f}s", flush=True)

    try:
        with torch.inference_mode(False):
            _, reports, rows = training.train(model, clip, request, report)
    except KeyboardInterrupt:
        raise SystemExit(f"stopped; progress kept in {training.partial_path(out)} (continue with --resume)") from None
    print(f"saved {out}: {len(reports)} iterations, {rows:.1f} UNet rows per iteration")


def load_models(options: argparse.Namespace) -> tuple:
    """(MODEL, CLIP) as ComfyUI's loader nodes give them; a checkpoint without a text encoder is refused
    before anything is trained."""
    import comfy.sd

    if not options.text_encoder:
        model, clip = comfy.sd.load_checkpoint_guess_config(options.checkpoint, output_vae=False)[:2]
        if clip is None:
            raise SystemExit(f"{os.path.basename(options.checkpoint)} holds no text encoder: give its text encoder "
                             "files with --text-encoder (Flux.1: clip_l and t5xxl)")
        return model, clip
    clip_type = getattr(comfy.sd.CLIPType, options.text_encoder_type.upper(), None)
    if clip_type is None:
        raise SystemExit(f"--text-encoder-type {options.text_encoder_type!r} is not one of "
                         f"{', '.join(t.name.lower() for t in comfy.sd.CLIPType)}")
    return (comfy.sd.load_diffusion_model(options.checkpoint),
            comfy.sd.load_clip(ckpt_paths=options.text_encoder, clip_type=clip_type))


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main(sys.argv[1:])
