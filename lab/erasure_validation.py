"""Does spm_core.erasure's level predict what the classifier sees? For each benchmark concept, one
membrane is trained with the pack's own training code (Lab.train_membrane, the benchmark's settings
but more iterations) and snapshotted along the way; at every snapshot the level is taken from the
model alone and the snapshot's erasure is measured with the benchmark's own measure (membrane always
open, so no gate interferes). Per probe the raw projections are kept, so every formula and probe
set compared below comes from the same predictions.

usage: python -m lab.erasure_validation [--concepts cross circle ...] [--snapshots 25 50 100 200 400]
                                              [--count 32] [--json out/erasure_validation.json]
                                              [--folder DIR] [--comfyui PATH] [--report]
(--report prints the tables of an earlier run's JSON without training or sampling; a run skips the
concepts its JSON already holds)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from unittest import mock

from .harness import Lab, MembraneSettings
from .membranes import ERASED

# cross and circle are the ones the default membranes erase worst (8% and 79%): early signal
ORDER = ("cross", "circle", "snowman", "red", "triangle", "blue", "yellow", "mushroom", "tree", "striped")
# Recorded on more probes than the measure needs, so that the cheap probe set can be chosen from them.
PROBE_SEEDS = (0, 1, 2, 3)
PROBE_STEPS = (1, 2, 3, 5, 7, 10, 13, 16)  # of the 20 rollout steps
ERASED_ENOUGH = 0.95


def probe_stats(predictions, probes, seeds: Sequence[int], steps: Sequence[int]) -> list[dict]:
    """Per probe: its step and seed, <on - pos, neu - pos>, ||neu - pos||² and ||on - neu||."""
    seeds_of = [(k, s) for k in steps for s in seeds]  # make_probes' order: steps outer, seeds inner
    rows = []
    for index, (step, seed) in enumerate(seeds_of):
        moved = (predictions.on[index] - predictions.positive[index]).flatten()
        line = (predictions.neutral[index] - predictions.positive[index]).flatten()
        rows.append({"step": step, "seed": seed, "sigma": float(probes[index].sigma), "along": float(moved @ line),
                     "line2": float(line @ line),
                     "from_neutral": float((predictions.on[index] - predictions.neutral[index]).norm())})
    return rows


def train_with_snapshots(lab: Lab, concept: str, snapshots: Sequence[int]) -> tuple[list[dict], float]:
    """Trains `concept`'s membrane to max(snapshots) iterations; at each snapshot saves the membrane
    (file named by concept and iteration) and records the probes' statistics. Returns them and the
    training seconds per iteration (the measure's own time excluded)."""
    training, erasure = lab.pack("nodes.training"), lab.pack("spm_core.erasure")
    file_format = lab.pack("spm_core.file_format")
    architecture = training.ARCHITECTURE_OF.get(type(lab.model.model.model_config).__name__, "unknown")
    probes: list = []
    records: list[dict] = []
    measuring = 0.0

    def set_membrane(trainer) -> Callable[[bool], None]:
        return lambda on: setattr(trainer.membrane, "enabled", on)

    class Observed(training.Trainer):
        """The pack's Trainer, observed after the iterations named in `snapshots`."""

        def step(self, iteration: int):
            nonlocal measuring
            config = self.config
            if not probes:
                probes.extend(erasure.make_probes(self.model, self.concepts[0].target, self.empty, config.latent_sizes[0],
                                                  PROBE_SEEDS, config.rollout_steps, config.rollout_cfg, PROBE_STEPS))
            report = super().step(iteration)
            if iteration + 1 in snapshots:
                began = time.perf_counter()
                predictions = erasure.predict(self.model, set_membrane(self), self.concepts[0], probes)
                measuring += time.perf_counter() - began
                name = f"{concept}-validation-{iteration + 1}.safetensors"
                membrane = self.membrane.as_membrane(name[:-12], (self.concepts[0].concept,), architecture)
                file_format.save_membrane(os.path.join(lab.membrane_dir, name), membrane)
                records.append({"iterations": iteration + 1, "file": name, "erase_loss": report.erase_loss,
                                "probes": probe_stats(predictions, probes, PROBE_SEEDS, PROBE_STEPS)})
            return report

    settings = dataclasses.replace(MembraneSettings(), iterations=max(snapshots))
    final = os.path.join(lab.membrane_dir, f"{concept}-validation.safetensors")
    if os.path.exists(final):  # left by a run that stopped before its results were written
        os.remove(final)
    began = time.perf_counter()
    with mock.patch.object(training, "Trainer", Observed):
        lab.train_membrane(f"{concept}-validation", [concept], settings)
    seconds = time.perf_counter() - began - measuring
    print(f"  {concept}: trained {max(snapshots)} iterations in {seconds:.0f} s; one measure on "
          f"{len(probes)} probes took {measuring / len(snapshots):.2f} s", flush=True)
    return records, seconds / max(snapshots)


def classifier_erasure(lab: Lab, evaluator, concept: str, files: Sequence[str | None]) -> list[dict]:
    """The benchmark's measure for each file (None: the bare model), always open."""
    from .benchmark import measure, panel
    from .erasure_benchmark import OTHERS, TARGETS
    from .setups import Chain

    # erasure only: the other prompts (preservation) would triple the sampling
    concept_panel = dataclasses.replace(panel(concept, [concept], TARGETS, OTHERS), others=[])
    results = []
    for file in files:
        setup = evaluator.bare if file is None else Chain(lab, file, [file], "always_open")
        m = measure(evaluator, setup, concept_panel, with_paraphrases=False)
        results.append({"erased": m.erased, "erased_n": m.erased_n, "erased_into_noise": m.erased_into_noise})
    return results


def run_concept(lab: Lab, evaluator, concept: str, snapshots: Sequence[int]) -> dict:
    records, seconds_per_iteration = train_with_snapshots(lab, concept, snapshots)
    readings = classifier_erasure(lab, evaluator, concept, [None] + [r["file"] for r in records])
    bare = {"iterations": 0, "probes": None, **readings[0]}
    return {"concept": concept, "seconds_per_iteration": seconds_per_iteration,
            "snapshots": [bare] + [{**r, **reading} for r, reading in zip(records, readings[1:])]}


# ---- analysis: formulas and probe sets compared on the recorded statistics ----

def projection_pooled(probes: list[dict]) -> float:
    return sum(p["along"] for p in probes) / sum(p["line2"] for p in probes)


def projection_mean(probes: list[dict]) -> float:
    return statistics.mean(p["along"] / p["line2"] for p in probes)


def distance_pooled(probes: list[dict]) -> float:
    return 1 - sum(p["from_neutral"] for p in probes) / sum(p["line2"] ** 0.5 for p in probes)


FORMULAS = {"projection, pooled": projection_pooled, "projection, mean of ratios": projection_mean,
            "distance to neutral, pooled": distance_pooled}


def probe_sets() -> dict[str, Callable[[dict], bool]]:
    sets: dict[str, Callable[[dict], bool]] = {"all 32": lambda p: True}
    for step in PROBE_STEPS:
        sets[f"step {step}, 4 seeds"] = lambda p, step=step: p["step"] == step
    for steps in ((2, 5, 10), (3, 7, 13), (1, 3, 7), (2, 5), (5, 10)):
        for seeds in ((0, 1), (0, 1, 2, 3)):
            sets[f"steps {steps}, {len(seeds)} seeds"] = \
                lambda p, steps=steps, seeds=seeds: p["step"] in steps and p["seed"] in seeds
    return sets


def ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    if len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return statistics.correlation(ranks(a), ranks(b))


def points(results: list[dict], formula, keep) -> list[tuple[str, int, float, float]]:
    """(concept, iterations, level, classifier erased) for every trained snapshot."""
    return [(r["concept"], s["iterations"], formula([p for p in s["probes"] if keep(p)]), s["erased"])
            for r in results for s in r["snapshots"] if s["probes"] is not None]


def threshold(pts: list[tuple[str, int, float, float]]) -> tuple[float | None, str]:
    """The lowest level above which every snapshot is erased >= ERASED_ENOUGH, and how many lie above it."""
    ordered = sorted(pts, key=lambda p: p[2])
    for index, point in enumerate(ordered):
        if all(q[3] >= ERASED_ENOUGH for q in ordered[index:]):
            below = ordered[:index]
            enough_below = sum(q[3] >= ERASED_ENOUGH for q in below)
            return point[2], (f"{len(ordered) - index} of {len(ordered)} snapshots at or above it, all erased "
                              f">= {ERASED_ENOUGH:.0%}; below it {enough_below} of {len(below)} are")
    return None, "no level separates"


def report(results: list[dict], formula_name: str, set_name: str) -> None:
    sets = probe_sets()
    print(f"\nRank correlation (Spearman) of level with classifier erasure over "
          f"{len(points(results, projection_pooled, sets['all 32']))} snapshots")
    print(f"{'probe set':<28}" + "".join(f"{name:>30}" for name in FORMULAS))
    for name, keep in sets.items():
        print(f"{name:<28}" + "".join(f"{spearman([p[2] for p in pts], [p[3] for p in pts]):>30.3f}"
                                      for pts in (points(results, f, keep) for f in FORMULAS.values())))
    chosen = points(results, FORMULAS[formula_name], sets[set_name])
    snapshots = sorted({p[1] for p in chosen})
    print(f"\nLevel ({formula_name}, {set_name}) / classifier erased, always open, per concept and iterations")
    print(f"{'concept':<10}{'bare':>8}" + "".join(f"{n:>16}" for n in snapshots))
    for r in results:
        row = {p[1]: p for p in chosen if p[0] == r["concept"]}
        print(f"{r['concept']:<10}{r['snapshots'][0]['erased']:>8.0%}"
              + "".join(f"{row[n][2]:>9.2f} / {row[n][3]:>4.0%}" for n in snapshots))
    within = [[(p[2], p[3]) for p in chosen if p[0] == r["concept"]] for r in results]
    within = [spearman(*zip(*pairs)) for pairs in within if len({erased for _, erased in pairs}) > 1]
    print(f"\nSpearman over all: {spearman([p[2] for p in chosen], [p[3] for p in chosen]):.3f}; within a concept "
          f"(median of {len(within)} whose erasure changes): {statistics.median(within) if within else float('nan'):.3f}")
    level, text = threshold(chosen)
    print(f"threshold for >= {ERASED_ENOUGH:.0%} classifier erasure: level {level if level is None else round(level, 3)} ({text})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concepts", nargs="+", default=list(ORDER), choices=list(ERASED))
    parser.add_argument("--snapshots", nargs="+", type=int, default=[25, 50, 100, 200, 400])
    parser.add_argument("--count", type=int, default=32, help="generations per prompt")
    parser.add_argument("--json", default=os.path.join("out", "erasure_validation.json"))
    parser.add_argument("--folder", default=os.path.join("out", "erasure_validation"), help="where snapshots are saved")
    parser.add_argument("--comfyui", default=None)
    parser.add_argument("--formula", default="projection, pooled", choices=list(FORMULAS))
    parser.add_argument("--probes", default="steps (2, 5, 10), 2 seeds", choices=list(probe_sets()))
    parser.add_argument("--report", action="store_true", help="only print the tables of --json")
    options = parser.parse_args()
    results = json.load(open(options.json)) if os.path.exists(options.json) else []
    if not options.report:
        from .benchmark import Evaluator

        lab = Lab(options.comfyui, membrane_dir=options.folder)
        evaluator = Evaluator(lab, options.count)
        done = {r["concept"] for r in results}
        for concept in [c for c in options.concepts if c not in done]:
            results.append(run_concept(lab, evaluator, concept, sorted(options.snapshots)))
            os.makedirs(os.path.dirname(os.path.abspath(options.json)), exist_ok=True)
            with open(options.json, "w") as file:
                json.dump(results, file, indent=1)
            print(" ", concept, [(s["iterations"], round(s["erased"], 3)) for s in results[-1]["snapshots"]], flush=True)
    report(results, options.formula, options.probes)


if __name__ == "__main__":
    main()
