"""Erasure benchmark on the miniature world (miniworld/): prints tables, optionally writes JSON.

usage: python scripts/erasure_benchmark.py --bare [--count 32] [--json PATH] [--comfyui PATH/TO/ComfyUI]

--bare   samples the shipped model without any membrane: every evaluation prompt (each shape in
         each colour, each character, a striped version of each object) `--count` times at fixed
         seeds, and reports the classifier's accuracy per concept and per family (95% Wilson
         intervals), i.e. whether the model draws what it is asked for before anything is erased.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def bare(lab, count: int) -> dict:
    from miniworld.evaluate import concept_accuracy, family_accuracy, generate_and_read, request_accuracy, wilson_interval
    from miniworld.world import CONCEPTS, evaluation_prompts

    requests = evaluation_prompts()
    readings = generate_and_read(lab, lab.model, requests, count)
    per_concept = concept_accuracy(readings, requests)
    generations = {c.name: count * sum(c.name in r.concepts for r in requests) for c in CONCEPTS}
    print(f"\nBare miniature model: classifier accuracy on its own generations ({count} per prompt)")
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
    return {"count": count, "per_concept": per_concept, "per_family": per_family, "per_prompt": per_prompt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bare", action="store_true", help="accuracy of the bare shipped model")
    parser.add_argument("--count", type=int, default=32, help="generations per prompt (at least 32 for reported numbers)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--comfyui", default=None, help="ComfyUI folder (default: the host of scripts/install_host.sh)")
    options = parser.parse_args()
    if not options.bare:
        parser.error("choose an experiment: --bare")
    from miniworld.lab import SAMPLER, Lab

    started = time.time()
    lab = Lab(options.comfyui)
    results = {"sampler": SAMPLER, "bare": bare(lab, options.count)}
    results["seconds"] = round(time.time() - started, 1)
    print(f"\n{results['seconds']:.0f} s")
    if options.json:
        with open(options.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
