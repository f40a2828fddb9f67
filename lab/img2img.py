"""The membrane in img2img: does it still erase, keep the rest, and open only for its concept when
sampling starts from a picture instead of pure noise?

    python -m lab.img2img [--membrane-dir DIR] [--count 32] [--json FILE]

Trains the default "snowman" membrane once (kept in DIR), samples the bare model's pictures of a
start prompt at fixed seeds, then runs KSampler on those latents at each denoise (and text-to-image
from an empty latent) with the membrane at transport `latent`, with and without it, for the target
and for unrelated prompts. Prints, per denoise: the target found by the bare model, the target erased
into clean pictures by the membrane, the unrelated prompts kept (bare and with the membrane), and the
gate the unrelated prompts and the target got (the text gate, or the latent gate when higher): as
sampling measures it, and as it was measured before img2img runs were asked at the latent gate's
calibration point (at the start picture; nodes.runtime._latent_gate_start).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from .harness import PICTURE_SIDE, SAMPLER, Lab

TARGET = "snowman"
START_PROMPT = "a red circle"
TARGET_PROMPT = "a snowman"
UNRELATED = {"a red circle": "circle", "a tree": "tree", "a blue square": "square"}
DENOISES = (1.0, 0.8, 0.5, 0.3)  # 1.0: text-to-image from an empty latent


@torch.no_grad()
def sample(lab: Lab, model, prompt: str, latent: torch.Tensor, denoise: float, seed: int) -> torch.Tensor:
    import nodes

    (out,) = nodes.KSampler().sample(model, seed, SAMPLER["steps"], SAMPLER["cfg"], SAMPLER["sampler_name"],
                                     SAMPLER["scheduler"], lab.encode(prompt), lab.encode(""), {"samples": latent},
                                     denoise=denoise)
    return out["samples"]




@torch.no_grad()
def gate_at_picture(lab: Lab, model, prompt: str, start: torch.Tensor, denoise: float, seed: int) -> float:
    """The gate (text gate, or the latent gate when higher) as sampling measured it before img2img runs
    were asked at the latent gate's calibration point: from the start picture noised to the run's first
    sigma, as KSampler noises it, looking ahead over the run's own first steps."""
    import comfy.sample
    import comfy.samplers

    state = lab.pack("nodes.runtime").state_of(model)
    base = model.model
    sampling = base.model_sampling
    sigmas = comfy.samplers.calculate_sigmas(sampling, SAMPLER["scheduler"], int(SAMPLER["steps"] / denoise))
    sigma = sigmas[-(SAMPLER["steps"] + 1)].reshape(1)
    noise = comfy.sample.prepare_noise(start[:1], seed)
    x = sampling.noise_scaling(sigma, noise, base.process_latent_in(start[:1]))
    conditioning, options = lab.encode(prompt)[0]
    text_gate = float(state.gates_for(conditioning[:1], options.get(lab.pack("nodes.encode").TOKENS_KEY))[0, 0])

    def run_bare(contexts, sources, pooled, latents, step_sigma):
        rows_context = conditioning[[0] * len(sources)] if contexts is None else contexts
        return base.apply_model(latents, step_sigma.reshape(1).expand(len(sources)), c_crossattn=rows_context).float()

    steps = lab.pack("spm_core.transport").LATENT_LOOKAHEAD_STEPS
    look_ahead_sigmas = [step_sigma.reshape(()) for step_sigma in sigmas[-(SAMPLER["steps"] + 1):][: steps + 1]]
    return max(text_gate, float(state.latent_gates(run_bare, None, [0], x, look_ahead_sigmas)[0, 0]))


def measure(lab: Lab, membrane: str, count: int) -> list[dict]:
    import nodes
    from miniworld.classifier import classify

    bare = lab.model
    erasing = lab.apply(bare, membrane, transport="latent")
    state = lab.pack("nodes.runtime").state_of(erasing)
    (empty,) = nodes.EmptyLatentImage().generate(PICTURE_SIDE, PICTURE_SIDE, count)
    start = sample(lab, bare, START_PROMPT, empty["samples"], 1.0, seed=100)
    rows = []
    for denoise in DENOISES:
        latent = empty["samples"] if denoise == 1.0 else start
        row: dict[str, float] = {"denoise": denoise}
        verdicts = {}
        gates = {}
        for prompt in [TARGET_PROMPT, *UNRELATED]:
            for label, model in (("bare", bare), ("membrane", erasing)):
                verdicts[(prompt, label)] = classify(lab.classifier, lab.vae.pictures(sample(lab, model, prompt, latent, denoise, 7)))
            gates[prompt] = state.last_gates["positive"][0]
        target_bare, target_membrane = verdicts[(TARGET_PROMPT, "bare")], verdicts[(TARGET_PROMPT, "membrane")]
        row["target found, bare"] = statistics.mean(v.finds(TARGET) for v in target_bare)
        row["target erased into clean pictures"] = statistics.mean(not v.finds(TARGET) and v.is_clean for v in target_membrane)
        row["target into noise"] = statistics.mean(not v.is_clean for v in target_membrane)
        row["target found, membrane"] = statistics.mean(v.finds(TARGET) for v in target_membrane)
        for label in ("bare", "membrane"):
            row[f"unrelated kept, {label}"] = statistics.mean(
                v.finds(concept) and v.is_clean for prompt, concept in UNRELATED.items() for v in verdicts[(prompt, label)])
        row["gate, target"] = gates[TARGET_PROMPT]
        row["gate, unrelated (mean)"] = statistics.mean(gates[prompt] for prompt in UNRELATED)
        if denoise < 1.0:
            row["unrelated gate if asked at the picture"] = statistics.mean(
                gate_at_picture(lab, erasing, prompt, latent, denoise, 7) for prompt in UNRELATED)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--membrane-dir", default="out/img2img", help="where the snowman membrane is kept")
    parser.add_argument("--count", type=int, default=32, help="pictures per prompt and denoise")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    lab = Lab(membrane_dir=os.path.abspath(args.membrane_dir))
    membrane = f"{TARGET}.safetensors"
    if not os.path.exists(os.path.join(lab.membrane_dir, membrane)):
        lab.train_membrane(TARGET, [TARGET])
    rows = measure(lab, membrane, args.count)
    keys = list(dict.fromkeys(key for row in rows for key in row))
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join("txt2img" if key == "denoise" and row[key] == 1.0 else
                                 ("" if key not in row else f"{float(row[key]):.2f}")
                                 for key in keys) + " |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
