"""The erasure benchmark on the miniature world: its experiments, their tables and the JSON they
return. scripts/erasure_benchmark.py runs it (the modes are described there)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict

from miniworld.model import MODEL_FILE, load_world
from miniworld.world import CONCEPTS, evaluation_prompts

from .attack import AttackSettings, conditioning_of, optimise, typed
from .benchmark import Evaluator, found_share, measure, measure_stack, panel
from .calibration import calibrate, calibrate_breach, print_breach_calibration, print_calibration
from .evaluate import concept_accuracy, family_accuracy, generate_and_read, request_accuracy, wilson_interval
from .harness import SAMPLER, Lab
from .host import REPO
from .membranes import ERASED, KEPT, VARIANTS, anchor_variant, membrane
from .paraphrases import paraphrases
from .setups import Bare, Chain, Official, StockLoraLoader
from .textual_inversion import embedding_prompt, learn_embedding, save_embedding

TARGETS, OTHERS = 3, 4  # prompts per erased concept for erasure and for preservation
QUICK_CONCEPTS = ("snowman",)
ABLATION_CONCEPTS = ("circle", "red", "snowman", "striped")  # one per family
STACK_OF_THREE = ("circle", "red", "snowman")
SWEEP_CONCEPTS, SWEEP_STRENGTHS = ("snowman", "red"), (1.0, 10.0, 100.0)
FINETUNE_ARGS = ["--striped-share", "0.6", "--steps", "400", "--lr", "3e-4", "--warmup", "20", "--seed", "1"]


def bare(lab, count: int) -> dict:
    requests = evaluation_prompts()
    readings = generate_and_read(lab, lab.model, requests, count)
    per_concept = concept_accuracy(readings, requests)
    generations = {c.name: count * sum(c.name in r.concepts for r in requests) for c in CONCEPTS}
    print(f"\nBare miniature model ({lab.world}): classifier accuracy on its own generations ({count} per prompt)")
    print(f"{'concept':<10} {'family':<10} {'found':>7}  {'95% CI':>13}  generations")
    for c in CONCEPTS:
        low, high = wilson_interval(per_concept[c.name], generations[c.name])
        print(f"{c.name:<10} {c.family:<10} {per_concept[c.name]:>7.1%}  [{low:.1%}, {high:.1%}]  {generations[c.name]}")
    per_family = family_accuracy(per_concept)
    print(f"\n{'family':<10} {'mean found':>10}")
    for family, value in per_family.items():
        print(f"{family:<10} {value:>10.1%}")
    per_prompt = {r.text: request_accuracy(readings[r.text], r) for r in requests}
    print(f"\nall named concepts found, mean over {len(requests)} prompts: {sum(per_prompt.values()) / len(per_prompt):.1%}")
    verdicts = [v for reading in readings.values() for v in reading]
    clean = sum(v.is_clean for v in verdicts)
    print(f"clean pictures (the classifier's clean head): {clean} of {len(verdicts)} ({clean / len(verdicts):.1%})")
    return {"count": count, "per_concept": per_concept, "per_family": per_family, "per_prompt": per_prompt,
            "clean": clean / len(verdicts)}


def single_setups(lab, concept: str, ablations: bool, quick: bool) -> list:
    ours = [membrane(lab, concept, "default", VARIANTS["default"])]
    setups = [Chain(lab, "paper gate", ours, "paper"), Chain(lab, "latent gate", ours, "latent")]
    if ablations:
        setups += [Chain(lab, "always open (LoRA loader)", ours, "always_open"), Official(lab, "official code", ours)]
        if not quick:
            setups += [Chain(lab, "cosine gate", ours, "cosine"), Chain(lab, "calibrated gate", ours, "calibrated"),
                       Chain(lab, "no latent anchoring (paper gate)",
                             [membrane(lab, concept, "no_anchoring", VARIANTS["no_anchoring"])], "paper")]
    return setups


def singles(lab, evaluator, concepts, ablation_concepts, quick: bool) -> list[dict]:
    measures = []
    for concept in concepts:
        concept_panel = panel(concept, [concept], TARGETS, OTHERS)
        for setup in single_setups(lab, concept, concept in ablation_concepts, quick):
            measures.append(asdict(measure(evaluator, setup, concept_panel)))
            print(f"  {concept:<9} {setup.label:<34} erased {measures[-1]['erased']:6.1%}  "
                  f"accuracy {measures[-1]['accuracy']:6.1%}  attack {measures[-1]['attack']:6.1%}", flush=True)
    return measures


def print_singles(measures: list[dict], count: int) -> dict:
    """The per-setup table over each setup's concepts, then, where setups cover different concepts,
    the same table over the concepts every setup has (a like-for-like comparison)."""
    summary = _print_singles_table(measures, count, "")
    shared = set.intersection(*({m["concept"] for m in measures if m["setup"] == label} for label in summary))
    if any(set(row["concepts"]) != shared for row in summary.values()):
        _print_singles_table([m for m in measures if m["concept"] in shared], count, f" -- only {', '.join(sorted(shared))}")
    return summary


def _print_singles_table(measures: list[dict], count: int, subset: str) -> dict:
    print(f"\nOne membrane at a time ({count} generations per prompt; {TARGETS} target and {OTHERS} other prompts "
          f"per concept; erased = a clean picture without the concept; noise = target generations that are not a "
          f"clean picture; attack = paraphrases never seen in training){subset}")
    header = (f"{'setup':<34} {'concepts':>8} {'erased':>7} {'95% CI':>15} {'noise':>6} {'accuracy':>9} {'bare':>6} "
              f"{'drift':>6} {'attack':>7} {'bare':>6}")
    print(header)
    summary = {}
    for label in dict.fromkeys(m["setup"] for m in measures):
        rows = [m for m in measures if m["setup"] == label]
        n = sum(m["erased_n"] for m in rows)
        erased = sum(m["erased"] * m["erased_n"] for m in rows) / n
        low, high = wilson_interval(erased, n)
        # runs saved before the clean head have no noise share: NaN, printed as "-"
        into_noise = sum(m.get("erased_into_noise", math.nan) * m["erased_n"] for m in rows) / n
        average = {key: sum(m[key] for m in rows) / len(rows) for key in ("accuracy", "bare_accuracy", "drift", "attack", "bare_attack")}
        summary[label] = {"concepts": [m["concept"] for m in rows], "erased": erased, "erased_ci": [low, high],
                          "erased_into_noise": into_noise, **average}
        noise = "-" if math.isnan(into_noise) else f"{into_noise:.1%}"
        attack = "-" if math.isnan(average["attack"]) else f"{average['attack']:.1%}"
        bare_attack = "-" if math.isnan(average["bare_attack"]) else f"{average['bare_attack']:.1%}"
        print(f"{label:<34} {len(rows):>8} {erased:>7.1%} [{low:5.1%}, {high:5.1%}] {noise:>6} {average['accuracy']:>9.1%} "
              f"{average['bare_accuracy']:>6.1%} {average['drift']:>6.3f} {attack:>7} {bare_attack:>6}")
    return summary


def print_per_concept(measures: list[dict], setup: str) -> None:
    rows = [m for m in measures if m["setup"] == setup]
    print(f"\nPer concept, {setup}")
    print(f"{'concept':<9} {'erased':>7} {'noise':>6} {'accuracy':>9} {'drift':>6} {'attack':>7} {'bare':>6}")
    for m in rows:
        noise = f"{m['erased_into_noise']:.1%}" if "erased_into_noise" in m else "-"
        print(f"{m['concept']:<9} {m['erased']:>7.1%} {noise:>6} {m['accuracy']:>9.1%} {m['drift']:>6.3f} "
              f"{m['attack']:>7.1%} {m['bare_attack']:>6.1%}")


def report(paths: list[str]) -> None:
    """The tables of earlier runs (their --json files) together, without sampling."""
    merged: dict = {"singles": [], "stacks": [], "attacks": [], "anchoring": [], "seconds": 0.0}
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            run = json.load(handle)
        merged["count"] = run["count"]
        merged["seconds"] += run.get("seconds", 0.0)
        for part in (run, run.get("adversarial", {}), run.get("rank4", {})):
            for key in ("singles", "stacks", "attacks", "anchoring"):
                merged[key] += part.get(key, [])
        merged["singles"] += run.get("transfer", [])
        if "calibration" in run:
            merged["calibration"] = run["calibration"]
    if "calibration" in merged:
        print_calibration(merged["calibration"])
    if merged["singles"]:
        print_singles(merged["singles"], merged["count"])
        print_per_concept(merged["singles"], "paper gate")
    if merged["stacks"]:
        print_stacks(merged["stacks"], merged["count"])
    if merged["anchoring"]:
        print_sweep(merged["anchoring"], merged["count"])
    if merged["attacks"]:
        print_attacks(merged["attacks"], merged["count"])
    print(f"\n{merged['seconds'] / 60:.0f} minutes of sampling and training in these runs")


def stacks(lab, evaluator, erased) -> list[dict]:
    requests = evaluation_prompts()
    results = []
    for group in (tuple(erased), STACK_OF_THREE):
        files = [membrane(lab, c, "default", VARIANTS["default"]) for c in group]
        kept = [c.name for c in CONCEPTS if c.name not in group]
        attacks = {c: paraphrases(c, [r for r in requests if c in r.concepts])[:1] for c in group}
        setups = [Chain(lab, "paper gate", files, "paper")]
        if len(group) == len(erased):
            setups += [Chain(lab, "latent gate", files, "latent"), Chain(lab, "always open (LoRA loader)", files, "always_open")]
        setups.append(Official(lab, "official code", files))
        for setup in setups:
            result = asdict(measure_stack(evaluator, setup, group, kept, attacks))
            result["membranes"] = len(group)
            results.append(result)
            erased_mean = sum(result["erased"].values()) / len(group)
            kept_mean = sum(result["kept_found"].values()) / len(kept)
            print(f"  {len(group):>2} membranes  {setup.label:<26} erased {erased_mean:6.1%}  kept found {kept_mean:6.1%}  "
                  f"clean accuracy {result['accuracy']:6.1%}  attack {result['attack']:6.1%}", flush=True)
    return results


def print_stacks(results: list[dict], count: int) -> None:
    print(f"\nSeveral membranes at once (every evaluation prompt, {count} generations each)")
    print(f"{'membranes':>9} {'setup':<26} {'erased':>7} {'min':>6} {'noise':>6} {'kept found':>10} {'clean acc':>9} "
          f"{'bare':>6} {'drift':>6} {'attack':>7} {'bare':>6}")
    for r in results:
        erased = list(r["erased"].values())
        kept = list(r["kept_found"].values())
        into_noise = list(r.get("erased_into_noise", {}).values())
        noise = f"{sum(into_noise) / len(into_noise):.1%}" if into_noise else "-"
        print(f"{r['membranes']:>9} {r['setup']:<26} {sum(erased) / len(erased):>7.1%} {min(erased):>6.1%} {noise:>6} "
              f"{sum(kept) / len(kept):>10.1%} {r['accuracy']:>9.1%} {r['bare_accuracy']:>6.1%} {r['drift']:>6.3f} "
              f"{r['attack']:>7.1%} {r['bare_attack']:>6.1%}")
    for r in results:  # runs saved before the gates were logged have none
        if r.get("off_target_gate"):
            print_stack_gates(r)


def print_stack_gates(result: dict) -> None:
    """Where a stack's membranes opened on prompts that do not name their concept."""
    print(f"\n{result['membranes']} membranes, {result['setup']}: per concept, erased / found where named, and its "
          "membrane's mean gate on the prompts that do not name it")
    print(f"{'concept':<9} {'erased':>7} {'off-target gate':>16}")
    for concept, gate in result["off_target_gate"].items():
        print(f"{concept:<9} {result['erased'][concept]:>7.1%} {gate:>16.3f}")
    kept = ", ".join(f"{c} {v:.1%}" for c, v in result["kept_found"].items())
    print(f"kept concepts found: {kept}")
    opened = result["opened_off_target"]
    print(f"membranes open at least halfway on a prompt not naming their concept: {len(opened)}")
    for prompt, label, gate in opened:
        print(f"  {prompt!r:<26} {label:<9} {gate:.2f}")


def latent_only(lab, evaluator, singles: bool = True, transport: str = "latent") -> dict:
    """The ten concepts one at a time (unless not `singles`) and all ten at once (the four kept
    concepts beside them), behind one gate (`transport`: latent or guarded): the main tables' latent
    rows in a fraction of the time."""
    files = [membrane(lab, concept, "default", VARIANTS["default"]) for concept in ERASED]
    label = f"{transport} gate"
    one_at_a_time = [asdict(measure(evaluator, Chain(lab, label, [file], transport), panel(concept, [concept], TARGETS, OTHERS)))
                     for concept, file in zip(ERASED, files)] if singles else []
    stack = asdict(measure_stack(evaluator, Chain(lab, label, files, transport), ERASED, KEPT, {}))
    return {"singles": one_at_a_time, "stacks": [{**stack, "membranes": len(files)}]}


def dit_rows(lab, evaluator, variant: str = "default") -> dict:
    """The miniature DiT's main rows: the ten concepts one at a time behind the token gate (the gate
    Flux membranes take), always open, and through ComfyUI's own LoRA loading (which applies single-block
    layers to every token), and all ten at once behind the token gate; membranes of `variant`."""
    files = [membrane(lab, concept, variant, VARIANTS[variant]) for concept in ERASED]
    one_at_a_time = [asdict(measure(evaluator, Chain(lab, label, [file], transport), panel(concept, [concept], TARGETS, OTHERS)))
                     for label, transport in DIT_TRANSPORTS for concept, file in zip(ERASED, files)]
    one_at_a_time += [asdict(measure(evaluator, StockLoraLoader(lab, STOCK_LOADER, file), panel(concept, [concept], TARGETS, OTHERS)))
                      for concept, file in zip(ERASED, files)]
    stack = asdict(measure_stack(evaluator, Chain(lab, "token gate", files, "tokens"), ERASED, KEPT, {}))
    return {"singles": one_at_a_time, "stacks": [{**stack, "membranes": len(files)}]}


DIT_TRANSPORTS = (("token gate", "tokens"), ("always open", "always_open"))
STOCK_LOADER = "stock LoraLoader"
ROBUST_TRANSPORTS = (("always open", "always_open"), ("latent gate", "latent"))
# the attack of prompt_attacks() that succeeded most against the default and rank-4 snowman
# membranes (--attacks; README, Robustness); it also fits in CI's time
STRONGEST_QUICK_ATTACK = "after-a-8"


def rank4_membranes(lab, evaluator, concepts, attacked: bool = True) -> dict:
    """The robustness candidate of training (lab.membranes "rank4": rank 4, 4 contexts), measured like
    the default membranes (the same panels) and, when `attacked`, attacked with the strongest attack,
    open and behind the latent gate."""
    measures = []
    for concept in concepts:
        candidate = [membrane(lab, concept, "rank4", VARIANTS["rank4"])]
        for label, transport in ROBUST_TRANSPORTS:
            setup = Chain(lab, f"rank4, {label}", candidate, transport)
            measures.append(asdict(measure(evaluator, setup, panel(concept, [concept], TARGETS, OTHERS))))
            print(f"  {concept:<9} {setup.label:<34} erased {measures[-1]['erased']:6.1%}  "
                  f"accuracy {measures[-1]['accuracy']:6.1%}  attack {measures[-1]['attack']:6.1%}", flush=True)
    if not attacked:
        return {"singles": measures, "attacks": []}
    strongest = prompt_attacks()[STRONGEST_QUICK_ATTACK][1]
    return {"singles": measures, "attacks": gradient_attacks(lab, evaluator, concepts, variant="rank4",
                                                             transports=ROBUST_TRANSPORTS, settings=strongest)}


def guarded_attacks(lab, evaluator, concepts) -> list[dict]:
    """The default membranes behind the guarded gate against the strongest attack, differentiated
    through both look-aheads and the replacement."""
    return gradient_attacks(lab, evaluator, concepts, transports=(("guarded gate", "guarded"),),
                            settings=prompt_attacks()[STRONGEST_QUICK_ATTACK][1])


def finetuned_copy(membrane_dir: str) -> str:
    """The shipped model fine-tuned further on shifted data (60% striped scenes, another seed; the
    text encoder kept): a stand-in for a community checkpoint. Trained once, kept beside the
    benchmark's membranes."""
    path = os.path.join(membrane_dir, "finetuned-miniworld.safetensors")
    if not os.path.exists(path):
        subprocess.run([sys.executable, "-m", "lab.train_model", "--start-from", MODEL_FILE, *FINETUNE_ARGS,
                        "--work", os.path.join(membrane_dir, "finetune-work"), "--export", path], cwd=REPO, check=True)
    return path


def transfer(lab, evaluator, concepts) -> list[dict]:
    """Membranes trained on the shipped model, applied unchanged to the fine-tuned copy."""
    finetuned = load_world(finetuned_copy(lab.membrane_dir))[0]
    finetuned_bare = Bare(lab, finetuned, "fine-tuned copy")
    rows = []
    for concept in concepts:
        ours = [membrane(lab, concept, "default", VARIANTS["default"])]
        concept_panel = panel(concept, [concept], TARGETS, OTHERS)
        unchanged = measure(evaluator, finetuned_bare, concept_panel, with_paraphrases=False, bare=finetuned_bare)
        for transport in ("paper", "latent"):
            setup = Chain(lab, f"on the fine-tuned copy, {transport} gate", ours, transport, model=finetuned)
            result = asdict(measure(evaluator, setup, concept_panel, with_paraphrases=False, bare=finetuned_bare))
            rows.append({**result, "finetuned_draws_target": 1.0 - unchanged.erased})
            print(f"  {concept:<9} {setup.label:<34} erased {result['erased']:6.1%}  accuracy {result['accuracy']:6.1%} "
                  f"(copy without membrane {result['bare_accuracy']:6.1%}; draws the target {1.0 - unchanged.erased:6.1%})",
                  flush=True)
    return rows


def anchoring_sweep(lab, evaluator) -> list[dict]:
    """Prompt anchors (ours) against Gaussian anchors (the official sampler) over anchor strengths,
    so the two can be compared where they erase equally."""
    rows = []
    for concept in SWEEP_CONCEPTS:
        for surrogates in ("prompts", "gaussian"):
            for strength in SWEEP_STRENGTHS:
                file = membrane(lab, concept, f"{surrogates}{strength:g}", anchor_variant(surrogates, strength))
                setup = Chain(lab, f"{surrogates} anchors x{strength:g}", [file], "paper")
                result = asdict(measure(evaluator, setup, panel(concept, [concept], TARGETS, OTHERS), with_paraphrases=False))
                rows.append({**result, "surrogates": surrogates, "strength": strength})
                print(f"  {concept:<9} {setup.label:<24} erased {result['erased']:6.1%}  accuracy {result['accuracy']:6.1%}  "
                      f"drift {result['drift']:.3f}", flush=True)
    return rows


def print_sweep(rows: list[dict], count: int) -> None:
    print(f"\nLatent anchoring: prompt vs Gaussian anchors over anchor strength (paper gate, {count} generations per prompt)")
    print(f"{'concept':<9} {'anchors':<9} {'strength':>8} {'erased':>7} {'noise':>6} {'accuracy':>9} {'bare':>6} {'drift':>6}")
    for r in rows:
        noise = f"{r['erased_into_noise']:.1%}" if "erased_into_noise" in r else "-"
        print(f"{r['concept']:<9} {r['surrogates']:<9} {r['strength']:>8g} {r['erased']:>7.1%} {noise:>6} "
              f"{r['accuracy']:>9.1%} {r['bare_accuracy']:>6.1%} {r['drift']:>6.3f}")


def gradient_attacks(lab, evaluator, concepts, variant: str = "default",
                     transports=(("paper gate", "paper"), ("latent gate", "latent")), settings=None) -> list[dict]:
    """`settings` (an AttackSettings; default: the benchmark's original attack) against each concept's
    membrane of `variant` under each (label, transport)."""
    settings = settings or AttackSettings()
    results = []
    for concept in concepts:
        ours = [membrane(lab, concept, variant, VARIANTS[variant])]
        prefix = "" if variant == "default" else f"{variant}, "
        for chain in (Chain(lab, f"{prefix}{label}", ours, transport) for label, transport in transports):
            result = optimise(lab, chain.model, concept, settings)
            conditioning = conditioning_of(lab.clip, settings, result.vectors)
            seed = evaluator.seed_for(f"attack on {concept}")
            under = lab.read(lab.generate(chain.model, conditioning, evaluator.count, seed))
            gate = chain.state.last_gates.get("positive", [float("nan")])[0]
            bare = lab.read(lab.generate(lab.model, conditioning, evaluator.count, seed))
            evaluator.generations += 2 * evaluator.count
            share = found_share(under, concept)
            results.append({"concept": concept, "setup": chain.label, "found_under_membrane": share,
                            "found_bare": found_share(bare, concept),
                            "gate": gate, "start_loss": result.start_loss, "final_loss": result.final_loss,
                            "tokens": settings.soft_tokens, "steps": settings.steps, "restarts": settings.restarts})
            print(f"  {concept:<9} {chain.label:<25} attack found {share:6.1%} (gate {gate:.2f}; bare model "
                  f"{results[-1]['found_bare']:6.1%}; loss {result.start_loss:.4f} -> {result.final_loss:.4f})", flush=True)
    return results


def print_attacks(results: list[dict], count: int) -> None:
    settings = AttackSettings()
    print(f"\nGradient attack: free token embeddings after \"a\" optimised with Adam (lr {settings.learning_rate}, "
          f"batch {settings.batch}), the best of `restarts` runs, against the membrane and its gate; {count} generations "
          "through SPM Load Membrane")
    print(f"{'setup':<25} {'concepts':>8} {'tokens':>6} {'steps':>5} {'restarts':>8} {'attack success':>15} {'gate':>6} "
          f"{'bare model draws it':>20}")
    for label in dict.fromkeys(r["setup"] for r in results):
        rows = [r for r in results if r["setup"] == label]
        print(f"{label:<25} {len(rows):>8} {rows[0].get('tokens', settings.soft_tokens):>6} "
              f"{rows[0].get('steps', settings.steps):>5} {rows[0].get('restarts', 1):>8} "
              f"{sum(r['found_under_membrane'] for r in rows) / len(rows):>15.1%} "
              f"{sum(r['gate'] for r in rows) / len(rows):>6.2f} {sum(r['found_bare'] for r in rows) / len(rows):>20.1%}")


SUFFIX_WORDS = "a drawing on a dark background"  # words of the world's captions that name no concept
TI_VECTORS = (1, 2, 4)
GATES = ("paper", "latent")
LOOKING_AHEAD = ("latent", "guarded")  # --latent and --stack
# --attacks may also attack the membrane with no gate (the LoRA loader's way) or behind the guarded gate, and on
# the DiT world the token gate
TRANSPORTS = (*GATES, "guarded", "always_open", "tokens")


def prompt_attacks() -> dict:
    """name -> (what it is, AttackSettings): the gradient attack's variants, free token vectors (what an
    embedding file holds) then vocabulary words (a typed prompt, the published attacks' protocol)."""
    return {
        "after-a-3": ('"a" + 3 random tokens, 150 steps (the CI attack)', AttackSettings()),
        "word-3": ("\"a\" + 3 tokens started from the concept's word", AttackSettings(init="concept")),
        "suffix-3": (f'"{SUFFIX_WORDS}" + 3 tokens', AttackSettings(before=SUFFIX_WORDS)),
        "restarts-3": ('"a" + 3 tokens, best of 3 restarts', AttackSettings(restarts=3)),
        "after-a-8": ('"a" + 8 tokens, 400 steps', AttackSettings(soft_tokens=8, steps=400)),
        "after-a-8-bpda": ('"a" + 8 tokens, 400 steps, gradients through the gates\' clamps (BPDA)',
                           AttackSettings(soft_tokens=8, steps=400, straight_through=True)),
        "whole-8": ("8 tokens as the whole prompt, 400 steps", AttackSettings(soft_tokens=8, steps=400, before="")),
        "words-8": ('"a" + 8 vocabulary words, 400 steps (a typed prompt)',
                    AttackSettings(soft_tokens=8, steps=400, discrete=True)),
        "words-8-word": ('"a" + 8 vocabulary words started from the concept\'s word, 400 steps',
                         AttackSettings(soft_tokens=8, steps=400, discrete=True, init="concept")),
        "words-8-restarts": ('"a" + 8 vocabulary words, best of 3 restarts, 400 steps',
                             AttackSettings(soft_tokens=8, steps=400, discrete=True, restarts=3)),
        "prefix-5": ('5 vocabulary words before "a <concept>", 400 steps (UnlearnDiffAtk\'s protocol)',
                     AttackSettings(soft_tokens=5, steps=400, before="", after="a {concept}", discrete=True)),
    }


def attack_names() -> list[str]:
    return [*prompt_attacks(), *(f"ti-{kind}-{n}" for kind in ("bare", "adaptive") for n in TI_VECTORS)]


def _attack_row(lab, evaluator, chain, concept: str, prompt, seed: int) -> dict:
    """`prompt` (text or CONDITIONING) sampled through the chain's SPM Load Membrane and by the bare model."""
    under = lab.read(lab.generate(chain.model, prompt, evaluator.count, seed))
    gate = chain.state.last_gates.get("positive", [float("nan")])[0]
    bare = lab.read(lab.generate(lab.model, prompt, evaluator.count, seed))
    evaluator.generations += 2 * evaluator.count
    return {"concept": concept, "found_under_membrane": found_share(under, concept), "found_bare": found_share(bare, concept),
            "gate": gate}


def _learned(result, seconds: float) -> dict:
    return {"loss_first": result.losses[0], "loss_last": result.losses[-1], "start_loss": result.start_loss,
            "final_loss": result.final_loss, "seconds": round(seconds, 1)}


def attack_suite(lab, evaluator, concepts, variants, gates=GATES, names=None) -> list[dict]:
    """Every attack of `names` (default: all) on each concept's membrane of each variant, under each
    gate: the soft-token attacks and textual-inversion embeddings (learned on the bare model once
    per concept, or against the membrane and its gate) used as "a embedding:<name>" through ComfyUI's
    tokenizer. One row per attack: its success through SPM Load Membrane, the bare model's recall of
    the same prompt, the gate, the losses and the seconds it took to learn."""
    soft = prompt_attacks()
    names = list(names or (attack_names() if lab.world == "unet" else soft))
    if lab.world != "unet" and set(names) - set(soft):
        raise ValueError(f"textual inversion ({', '.join(sorted(set(names) - set(soft)))}) is measured in the UNet world "
                         "only: ComfyUI reads embedding files for CLIP, and the DiT's membranes bind to T5")
    rows = []
    for concept in concepts:
        seed = evaluator.seed_for(f"attack on {concept}")
        bare_embeddings: dict[int, tuple[str, dict]] = {}  # vectors -> (embedding name, how it was learned)
        for variant in variants:
            ours = [membrane(lab, concept, variant, VARIANTS[variant])]
            for gate in gates:
                chain = Chain(lab, f"{variant}, {gate} gate", ours, gate)
                where = {"variant": variant, "setup": chain.label}
                for name in names:
                    started = time.time()
                    if name in soft:
                        description, settings = soft[name]
                        settings = dataclasses.replace(settings, after=settings.after.format(concept=concept))
                        result = optimise(lab, chain.model, concept, settings)
                        learned = _learned(result, time.time() - started)
                        if settings.discrete:
                            learned["words"] = f"{settings.before} [{typed(lab.clip, result.vectors)}] {settings.after}".strip()
                        prompt = conditioning_of(lab.clip, settings, result.vectors)
                    else:
                        _, kind, vectors = name.split("-")
                        vectors = int(vectors)
                        description = f"textual inversion, {vectors} vector{'s' if vectors > 1 else ''}, " + (
                            "learned on the bare model" if kind == "bare" else "learned against the membrane and gate")
                        if kind == "bare" and vectors in bare_embeddings:
                            file, learned = bare_embeddings[vectors]
                        else:
                            result = learn_embedding(lab, concept, vectors, model=None if kind == "bare" else chain.model)
                            learned = _learned(result, time.time() - started)
                            stem = f"{concept}-ti-bare-{vectors}" if kind == "bare" else f"{concept}-ti-{variant}-{gate}-{vectors}"
                            file = save_embedding(os.path.join(lab.embedding_dir, f"{stem}.safetensors"), result.vectors)
                            if kind == "bare":
                                bare_embeddings[vectors] = (file, learned)
                        prompt = embedding_prompt(lab, file)
                    row = {**_attack_row(lab, evaluator, chain, concept, prompt, seed), **where, "attack": name,
                           "description": description, **learned}
                    rows.append(row)
                    print(f"  {concept:<9} {chain.label:<24} {name:<14} found {row['found_under_membrane']:6.1%} "
                          f"(bare {row['found_bare']:6.1%}; gate {row['gate']:.2f}; loss {row['start_loss']:.4f} -> "
                          f"{row['final_loss']:.4f}; {row['seconds']:.0f} s){' ' + row['words'] if 'words' in row else ''}",
                          flush=True)
    return rows


def strongest_attacks(rows: list[dict]) -> list[dict]:
    """Per concept and setup, the attack with the highest success (the first listed among equals)."""
    best: dict[tuple[str, str], dict] = {}
    for row in rows:
        key = (row["concept"], row["setup"])
        if key not in best or row["found_under_membrane"] > best[key]["found_under_membrane"]:
            best[key] = row
    return list(best.values())


def show_attack_suite(rows: list[dict], count: int) -> None:
    """Every attack, then the strongest per concept and setup beside the bare model's recall."""
    print(f"\nAttacks a user has ({count} generations each through SPM Load Membrane; bare: the same prompt "
          "without the membrane; seconds: learning the attack)")
    print(f"{'concept':<9} {'setup':<24} {'attack':<14} {'success':>8} {'bare':>6} {'gate':>5} {'loss':>15} {'s':>5}")
    for r in rows:
        print(f"{r['concept']:<9} {r['setup']:<24} {r['attack']:<14} {r['found_under_membrane']:>8.1%} {r['found_bare']:>6.1%} "
              f"{r['gate']:>5.2f} {r['start_loss']:>7.4f}>{r['final_loss']:<7.4f} {r['seconds']:>5.0f}")
    strongest = strongest_attacks(rows)
    print("\nStrongest attack per concept")
    print(f"{'concept':<9} {'setup':<24} {'attack':<14} {'success':>8} {'bare':>6} {'s':>5}  what it is")
    for r in strongest:
        print(f"{r['concept']:<9} {r['setup']:<24} {r['attack']:<14} {r['found_under_membrane']:>8.1%} {r['found_bare']:>6.1%} "
              f"{r['seconds']:>5.0f}  {r['description']}")
    for setup in dict.fromkeys(r["setup"] for r in strongest):
        chosen = [r for r in strongest if r["setup"] == setup]
        print(f"{setup}: strongest attack succeeds {sum(r['found_under_membrane'] for r in chosen) / len(chosen):.1%} "
              f"on average over {len(chosen)} concepts (bare model {sum(r['found_bare'] for r in chosen) / len(chosen):.1%})")


def erasure_experiments(lab, quick: bool, count: int) -> dict:
    """Everything but --bare: the tables printed, their numbers returned."""
    evaluator = Evaluator(lab, count)
    concepts = QUICK_CONCEPTS if quick else ERASED
    ablations = QUICK_CONCEPTS if quick else ABLATION_CONCEPTS
    results: dict = {}
    if not quick:
        results["calibration"] = print_calibration(calibrate(lab, ERASED))
    print("\nsampling, one membrane at a time", flush=True)
    results["singles"] = singles(lab, evaluator, concepts, ablations, quick)
    if not quick:
        print("\nsampling, membranes at once", flush=True)
        results["stacks"] = stacks(lab, evaluator, concepts)
    print("\ngradient attacks", flush=True)
    results["attacks"] = gradient_attacks(lab, evaluator, ablations)
    print("\nrank-4 membranes with 4 contexts", flush=True)
    rank4 = rank4_membranes(lab, evaluator, ablations, attacked=not quick)  # CI's time goes to the guarded gate's attack
    results["singles"] += rank4["singles"]
    results["attacks"] += rank4["attacks"]
    print("\nthe strongest attack behind the guarded gate", flush=True)
    results["attacks"] += guarded_attacks(lab, evaluator, ablations)
    if not quick:
        print("\nanchoring sweep", flush=True)
        results["anchoring"] = anchoring_sweep(lab, evaluator)
        print("\ntransfer to a fine-tuned copy", flush=True)
        results["transfer"] = transfer(lab, evaluator, ABLATION_CONCEPTS)
        results["singles"] += results["transfer"]
    results["singles_summary"] = print_singles(results["singles"], count)
    if not quick:
        print_stacks(results["stacks"], count)
        print_sweep(results["anchoring"], count)
    print_attacks(results["attacks"], count)
    results["generations"] = evaluator.generations
    return results


def run(mode: str | None, count: int, membrane_dir: str, embedding_dir: str, comfy_root: str | None = None,
        concepts: list[str] | None = None, variants: list[str] | None = None, gates: list[str] | None = None,
        names: list[str] | None = None, world: str = "unet") -> dict:
    """One mode of scripts/erasure_benchmark.py (None: the full benchmark, "quick": its reduced run)
    on the miniature `world` (lab.harness.WORLDS); `concepts`, `variants`, `gates` and `names` are
    the "attacks" mode's. The tables are printed, their numbers returned."""
    started = time.time()
    os.makedirs(membrane_dir, exist_ok=True)
    lab = Lab(comfy_root, membrane_dir=membrane_dir, embedding_dir=embedding_dir, world=world)
    results: dict = {"sampler": SAMPLER, "count": count, "world": lab.world}
    if mode == "bare":
        results["bare"] = bare(lab, count)
    elif mode == "dit":
        results.update(dit_rows(lab, Evaluator(lab, count), (variants or ["default"])[0]))
        results["singles_summary"] = print_singles(results["singles"], count)
        print_per_concept(results["singles"], "token gate")
        print_stacks(results["stacks"], count)
    elif mode == "calibrate":
        results["calibration"] = print_calibration(calibrate(lab, ERASED))
        defaults = {concept: membrane(lab, concept, "default", VARIANTS["default"]) for concept in ERASED}
        results["breach_calibration"] = print_breach_calibration(calibrate_breach(lab, defaults))
    elif mode in ("latent", "stack"):
        transport = (gates or ["latent"])[0]
        if transport not in LOOKING_AHEAD:
            raise ValueError(f"--{mode} measures the gates that look ahead ({', '.join(LOOKING_AHEAD)}), not {transport!r}")
        results.update(latent_only(lab, Evaluator(lab, count), singles=mode == "latent", transport=transport))
        if mode == "latent":
            results["singles_summary"] = print_singles(results["singles"], count)
            print_per_concept(results["singles"], f"{transport} gate")
        print_stacks(results["stacks"], count)
    elif mode == "rank4":
        results["rank4"] = rank4_membranes(lab, Evaluator(lab, count), ABLATION_CONCEPTS)
        results["singles_summary"] = print_singles(results["rank4"]["singles"], count)
        print_attacks(results["rank4"]["attacks"], count)
    elif mode == "transfer":
        results["transfer"] = transfer(lab, Evaluator(lab, count), ABLATION_CONCEPTS)
        results["singles_summary"] = print_singles(results["transfer"], count)
    elif mode == "attacks":
        results["attack_suite"] = attack_suite(lab, Evaluator(lab, count), concepts or list(ABLATION_CONCEPTS),
                                               variants or ["default"], gates or list(GATES), names)
        show_attack_suite(results["attack_suite"], count)
    elif mode == "anchoring":
        results["anchoring"] = anchoring_sweep(lab, Evaluator(lab, count))
        print_sweep(results["anchoring"], count)
    else:
        results.update(erasure_experiments(lab, mode == "quick", count))
    results["seconds"] = round(time.time() - started, 1)
    print(f"\n{results['seconds']:.0f} s")
    return results
