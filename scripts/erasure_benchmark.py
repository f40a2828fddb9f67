"""Erasure benchmark on the miniature world (miniworld/): prints tables, optionally writes JSON.

usage: python scripts/erasure_benchmark.py [--quick | --bare | --calibrate | --latent | --stack | --rank4 | --anchoring | --transfer
                                           | --attacks | --dit | --report JSON ...] [--world unet|dit]
                                           [--count 32] [--json PATH] [--membranes DIR] [--embeddings DIR]
                                           [--comfyui PATH]
                                           [--concepts C ...] [--variants V ...] [--gates G ...] [--attack-names A ...]

(default)      the full benchmark: the gate calibration; ten concepts erased one at a time with the
               paper and latent gates; on one concept per family every other transport, the official
               code's behaviour and no latent anchoring; ten and three membranes at once against the
               official merge; paraphrase and gradient attacks; rank-4 membranes with 4 contexts (open and gated); the
               strongest attack behind the guarded gate; prompt
               vs Gaussian anchors over anchor strength; transfer to a fine-tuned copy of the model
               (trained by lab.train_model). Membranes are trained with the pack's own
               SPM Train Membrane code and kept in --membranes, so a second run only samples.
--quick        one concept (snowman), the main setups, the rank-4 membrane, the original gradient attack and the
               strongest attack behind the guarded gate: what CI runs (tests/test_erasure_benchmark.py).
--bare         the shipped model without any membrane: the classifier's accuracy per concept and
               family, i.e. whether the model draws what it is asked for before anything is erased.
--calibrate    only the gate calibration (ROC over the world's captions), and the guarded gate's breach ramp
               from the ten default membranes (trained if --membranes lacks them).
--latent       ten concepts one at a time and all ten at once, latent gate only (about 30 minutes); with
               --gates guarded, behind the guarded gate instead.
--stack        only the ten at once of --latent, with where each membrane's gate opened on prompts that do not
               name its concept (about 3 minutes once the membranes exist); --gates guarded as for --latent.
--rank4        only the rank-4 membranes with 4 contexts (the robustness candidate).
--anchoring    only the sweep of prompt vs Gaussian anchors over anchor strength.
--transfer     only the transfer of the default membranes to the fine-tuned copy.
--attacks      every attack a user has (soft-token variants; typed prompts of vocabulary words found by the same
               gradient search; textual-inversion embeddings learned on the
               bare model and against the membrane, used as "a embedding:<name>" through ComfyUI's
               tokenizer) on --concepts (default circle red snowman striped) for the membrane --variants
               (default: default) under --gates (default paper latent; also guarded, always_open), limited to --attack-names if
               given; the strongest attack per concept beside the bare model's recall. One concept, one
               variant, one gate, one attack: a quick experiment.
--dit          the miniature DiT world (a tiny Flux, miniworld/dit.py): the ten concepts one at a time behind the
               token gate and always open, and all ten at once behind the token gate, with the membranes of the
               first --variants (default: default; cfg_rollouts: trained with rollouts at CFG 3, as this DiT is
               sampled with CFG).
--world dit    run --bare or --attacks on the miniature Flux (its gates: --gates tokens always_open; the
               soft-token and typed attacks move T5's tokens; textual inversion is the UNet world's only).
--report       the tables of earlier runs' --json files, merged, without sampling.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository, for lab
from lab.erasure_benchmark import ABLATION_CONCEPTS, GATES, TRANSPORTS, attack_names, report, run  # noqa: E402
from lab.host import REPO  # noqa: E402
from lab.membranes import VARIANTS  # noqa: E402

MODES = ("quick", "bare", "calibrate", "latent", "stack", "rank4", "anchoring", "transfer", "attacks", "dit")
DIT_MODES = ("bare", "attacks", "dit")  # what --world dit runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one concept, the main setups and the attack (what CI runs)")
    mode.add_argument("--bare", action="store_true", help="accuracy of the bare shipped model")
    mode.add_argument("--calibrate", action="store_true", help="only the gate calibration")
    mode.add_argument("--latent", action="store_true", help="ten concepts one at a time and at once, latent gate only")
    mode.add_argument("--stack", action="store_true", help="the ten membranes at once only, latent gate (part of --latent)")
    mode.add_argument("--rank4", action="store_true", help="only the rank-4 membranes with 4 contexts")
    mode.add_argument("--anchoring", action="store_true", help="only the anchoring sweep")
    mode.add_argument("--transfer", action="store_true", help="only the transfer to a fine-tuned copy")
    mode.add_argument("--attacks", action="store_true", help="every attack a user has, the strongest per concept")
    mode.add_argument("--dit", action="store_true", help="the miniature Flux: ten concepts one at a time and at once")
    mode.add_argument("--report", nargs="+", metavar="JSON", help="print the tables of earlier runs (no sampling)")
    parser.add_argument("--count", type=int, default=32, help="generations per prompt (at least 32 for reported numbers)")
    parser.add_argument("--membranes", default=os.path.join(REPO, "out", "benchmark", "membranes"),
                        help="where trained membranes are kept and reused")
    parser.add_argument("--embeddings", default=os.path.join(REPO, "out", "benchmark", "embeddings"),
                        help="ComfyUI's embeddings folder for this run: where --attacks writes its textual inversions")
    parser.add_argument("--concepts", nargs="+", default=list(ABLATION_CONCEPTS), help="--attacks: the erased concepts")
    parser.add_argument("--variants", nargs="+", default=["default"], help="--attacks: membrane variants (lab.membranes)")
    parser.add_argument("--gates", nargs="+", choices=list(TRANSPORTS),
                        help=f"--attacks: transports (default {' '.join(GATES)}); --latent, --stack: latent or guarded")
    parser.add_argument("--attack-names", nargs="+", choices=attack_names(), help="--attacks: only these attacks")
    parser.add_argument("--world", choices=("unet", "dit"), default="unet",
                        help="the miniature model: the shipped UNet, or the miniature Flux (--bare, --attacks, --dit)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--comfyui", default=None, help="ComfyUI folder (default: the host of scripts/install_host.sh)")
    options = parser.parse_args()
    if options.report:
        report(options.report)
        return
    unknown = set(options.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown membrane variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    mode_name = next((name for name in MODES if getattr(options, name)), None)
    world = "dit" if mode_name == "dit" else options.world
    if world == "dit" and mode_name not in DIT_MODES:
        parser.error(f"--world dit runs {', '.join('--' + m for m in DIT_MODES)} only")
    results = run(mode_name, options.count, options.membranes, options.embeddings, options.comfyui, options.concepts,
                  options.variants, options.gates, options.attack_names, world)
    if options.json:
        with open(options.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
