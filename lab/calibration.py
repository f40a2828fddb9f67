"""How well each gate tells prompts that ask for a concept from prompts that don't, measured on
captions from the miniature world's grammar (with every synonym, drawn with a seed the model was
not trained with), never on the benchmark's evaluation prompts.

For each erased concept and each gate: the ROC AUC of its raw score against "the caption names
the concept in any of its words", and, with the gate as SPM Load Membrane computes it, the share of such
captions it opens (gate >= 0.5) and the share of the others it opens. The latent gate's operating
point comes from here, by a rule fixed in advance: threshold = the 95th percentile of its cosine
over captions that do not name the concept, saturation = the median over captions that do,
averaged over the concepts (spm_core.transport.LATENT_THRESHOLD / LATENT_SATURATION), measured where
the runtime measures it: after the look-ahead. The calibrated text gate's ramp comes from the same
rule on its relative cosine (CALIBRATED_THRESHOLD / CALIBRATED_SATURATION).

The guarded gate's breach ramp (BREACH_THRESHOLD / BREACH_SATURATION) comes from the same captions
with each concept's default membrane fully open: threshold = the 99th percentile of the cosine,
measured after a look-ahead with the membrane open, over captions that do not name the concept (a
breach replaces the prompt, so almost none of those may trigger it); saturation = the median bare
cosine over captions that do, as for the latent gate; both averaged over the concepts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

from miniworld.world import caption, concept, random_scene

CAPTION_SEED = 9090
CAPTION_COUNT = 300
NOISE_SEEDS = (0, 1)


def captions() -> list[str]:
    rng = np.random.default_rng(CAPTION_SEED)
    return list(dict.fromkeys(caption(random_scene(rng), rng) for _ in range(CAPTION_COUNT)))


def names(text: str, name: str) -> bool:
    return any(re.search(rf"\b{re.escape(word)}\b", text) for word in concept(name).synonyms)


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting half (Mann-Whitney)."""
    above = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(above + 0.5 * ties)


@torch.no_grad()
def look_ahead_latents(lab, contexts: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the latent gate compares predictions, as the runtime measures it inside KSampler: each
    context's own latent after the bare model's look-ahead (spm_core.transport.look_ahead) from one
    noisy latent at the start of sampling, and the sigma there."""
    import comfy.model_management

    from .harness import PICTURE_SIDE

    transport, runtime = lab.pack("spm_core.transport"), lab.pack("nodes.runtime")
    comfy.model_management.load_models_gpu([lab.model])
    base = lab.model.model
    side = PICTURE_SIDE // 8
    noise = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(seed))
    sigma = base.model_sampling.sigma_max.reshape(1)
    start = base.model_sampling.noise_scaling(sigma, noise, torch.zeros_like(noise), max_denoise=True)
    sigmas = runtime.latent_gate_sigmas(base.model_sampling, sigma)
    empty = lab.pack("nodes.encode").encode_empty(lab.clip)[None].expand(contexts.shape[0], -1, -1)

    def denoise(x: torch.Tensor, step_sigma: torch.Tensor, conditional: bool) -> torch.Tensor:
        rows = contexts if conditional else empty
        return base.apply_model(x, step_sigma.reshape(1).expand(x.shape[0]), c_crossattn=rows).float()

    return transport.look_ahead(denoise, start.expand(contexts.shape[0], -1, -1, -1), sigmas), sigmas[-1]


@torch.no_grad()
def bare_predictions(lab, contexts: torch.Tensor, latent: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The bare model's denoised prediction for each context at one latent (1, ...) and sigma."""
    base = lab.model.model
    rows = contexts.shape[0]
    return base.apply_model(latent.expand(rows, -1, -1, -1), sigma.reshape(1).expand(rows), c_crossattn=contexts).float()


def gate_scores(lab, name: str, texts: Sequence[str], latents: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per gate: (raw score, gate as SPM Load Membrane computes it) for each text. `latents`: per noise
    seed, each text's look-ahead latent and the sigma there (look_ahead_latents)."""
    transport = lab.pack("spm_core.transport")
    encode = lab.pack("nodes.encode")
    concept_embedding = encode.encode_concept(lab.clip, name)
    empty = encode.encode_empty(lab.clip)
    conds = [lab.encode(t)[0] for t in texts]
    rows = torch.cat([embedding for embedding, _ in conds]).float()
    tokens = [options[encode.TOKENS_KEY] for _, options in conds]

    def gates(mode: str) -> np.ndarray:
        gate = transport.Transport([[concept_embedding]], transport.TransportMode(mode), empty=empty)
        return gate.gates(rows, tokens)[:, 0].numpy()

    relative = transport.chunked_flat_cosine(rows - empty, (concept_embedding.embedding - empty)[None])[:, 0].numpy()
    cosines, opened = [], None
    latent_transport = transport.Transport([[concept_embedding]], transport.TransportMode.LATENT, empty=empty)
    for seed in NOISE_SEEDS:
        x, sigma = latents[seed]
        shifts = []
        for index in range(len(texts)):
            predictions = bare_predictions(lab, torch.cat([empty[None], concept_embedding.embedding[None], rows[index:index + 1]]),
                                           x[index:index + 1], sigma)
            shifts.append((predictions[2:] - predictions[:1], predictions[1:2] - predictions[:1]))
        prompt_shifts, concept_shifts = torch.cat([p for p, _ in shifts]), [c for _, c in shifts]
        cosines.append(torch.cat([transport.latent_cosines(prompt_shifts[i:i + 1], concept_shifts[i])[:, 0]
                                  for i in range(len(texts))]))
        if opened is None:  # the runtime measures from one noisy latent: the first seed's
            opened = np.array([float(latent_transport.latent_gates(prompt_shifts[i:i + 1], concept_shifts[i])[0, 0])
                               for i in range(len(texts))])
    latent = torch.stack(cosines).mean(0).numpy()
    return {
        "paper": (gates("paper"), gates("paper")),
        "cosine": (gates("cosine"), gates("cosine")),
        "calibrated": (relative, gates("calibrated")),
        "latent": (latent, np.maximum(gates("calibrated"), opened)),
    }


def calibrate(lab, concepts: Sequence[str]) -> dict:
    texts = captions()
    result: dict = {"captions": len(texts), "concepts": {}}
    rows = torch.cat([lab.encode(t)[0][0] for t in texts]).float()
    latents = {seed: look_ahead_latents(lab, rows, seed) for seed in NOISE_SEEDS}
    for name in concepts:
        asks = np.array([names(t, name) for t in texts])
        per_gate = {}
        for gate, (raw, opened) in gate_scores(lab, name, texts, latents).items():
            per_gate[gate] = {
                "auc": roc_auc(raw[asks], raw[~asks]),
                "opens_concept": float((opened[asks] >= 0.5).mean()),
                "opens_other": float((opened[~asks] >= 0.5).mean()),
                "threshold": float(np.percentile(raw[~asks], 95)),
                "saturation": float(np.median(raw[asks])),
            }
        result["concepts"][name] = {"captions_naming": int(asks.sum()), "gates": per_gate}
    return result


@torch.no_grad()
def open_membrane_cosines(lab, membrane_file: str, name: str, rows: torch.Tensor, seed: int, opened: bool) -> np.ndarray:
    """Per caption (rows: their conditioning), the latent gate's cosine with concept `name` after a
    look-ahead from one noisy latent with the membrane fully open on the caption (the empty prompt
    bare), where the guarded gate measures a breach; with `opened` False, the bare model's throughout."""
    import comfy.model_management

    from .harness import PICTURE_SIDE
    from .setups import Chain

    transport, runtime = lab.pack("spm_core.transport"), lab.pack("nodes.runtime")
    chain = Chain(lab, "open", [membrane_file], "always_open")
    comfy.model_management.load_models_gpu([chain.model])
    base = chain.model.model
    chain.state.install_hooks(base)
    encode = lab.pack("nodes.encode")
    empty = encode.encode_empty(lab.clip)[None]
    concept = encode.encode_concept(lab.clip, name).embedding[None]

    def run(contexts: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, membrane_open: bool) -> torch.Tensor:
        count = x.shape[0]
        with chain.state.stack.gates_active(torch.full((count, 1), float(membrane_open))):
            return base.apply_model(x, sigma.reshape(1).expand(count), c_crossattn=contexts.expand(count, -1, -1)).float()

    def denoise(x: torch.Tensor, sigma: torch.Tensor, conditional: bool) -> torch.Tensor:
        return run(rows, x, sigma, opened) if conditional else run(empty, x, sigma, False)

    noise = torch.randn(1, 4, PICTURE_SIDE // 8, PICTURE_SIDE // 8, generator=torch.Generator().manual_seed(seed))
    sigma = base.model_sampling.sigma_max.reshape(1)
    start = base.model_sampling.noise_scaling(sigma, noise, torch.zeros_like(noise), max_denoise=True)
    sigmas = runtime.latent_gate_sigmas(base.model_sampling, sigma)
    x = transport.look_ahead(denoise, start.expand(rows.shape[0], -1, -1, -1), sigmas)
    empty_predictions = run(empty, x, sigmas[-1], False)
    prompt_shifts = run(rows, x, sigmas[-1], opened) - empty_predictions
    concept_shifts = run(concept, x, sigmas[-1], False) - empty_predictions
    return torch.cat([transport.latent_cosines(prompt_shifts[i: i + 1], concept_shifts[i: i + 1])
                      for i in range(rows.shape[0])])[:, 0].numpy()


def calibrate_breach(lab, membranes: dict[str, str]) -> dict:
    """The breach ramp's rule (module docstring) for each concept's membrane file in `membranes`."""
    texts = captions()
    rows = torch.cat([lab.encode(t)[0][0] for t in texts]).float()
    result: dict = {"captions": len(texts), "concepts": {}}
    for name, file in membranes.items():
        asks = np.array([names(t, name) for t in texts])
        cosines = {opened: np.mean([open_membrane_cosines(lab, file, name, rows, seed, opened) for seed in NOISE_SEEDS], axis=0)
                   for opened in (False, True)}
        result["concepts"][name] = {"threshold": float(np.percentile(cosines[True][~asks], 99)),
                                    "saturation": float(np.median(cosines[False][asks])),
                                    "open_median_asked": float(np.median(cosines[True][asks]))}
    return result


def print_breach_calibration(result: dict) -> dict:
    concepts = result["concepts"]
    print(f"\nBreach ramp (guarded gate) on {result['captions']} captions, each concept's membrane open")
    print(f"{'concept':<9} {'p99 other, open':>16} {'median asked, bare':>19} {'median asked, open':>19}")
    for name, values in concepts.items():
        print(f"{name:<9} {values['threshold']:>16.3f} {values['saturation']:>19.3f} {values['open_median_asked']:>19.3f}")
    result["summary"] = {key: float(np.mean([c[key] for c in concepts.values()])) for key in ("threshold", "saturation")}
    print(f"{'average':<9} {result['summary']['threshold']:>16.3f} {result['summary']['saturation']:>19.3f}")
    return result


def print_calibration(result: dict) -> dict:
    concepts = result["concepts"]
    gates = list(next(iter(concepts.values()))["gates"])
    print(f"\nGate calibration on {result['captions']} captions from the world's grammar (every synonym), "
          f"{len(concepts)} concepts")
    print(f"{'gate':<11} {'ROC AUC':>8} {'opens asked':>12} {'opens other':>12} {'p95 other':>10} {'median asked':>13}")
    summary = {}
    for gate in gates:
        values = {key: float(np.mean([c["gates"][gate][key] for c in concepts.values()]))
                  for key in ("auc", "opens_concept", "opens_other", "threshold", "saturation")}
        summary[gate] = values
        print(f"{gate:<11} {values['auc']:>8.3f} {values['opens_concept']:>12.1%} {values['opens_other']:>12.1%} "
              f"{values['threshold']:>10.3f} {values['saturation']:>13.3f}")
    result["summary"] = summary
    return result
