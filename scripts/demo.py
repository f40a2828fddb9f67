"""The demo: erase "snowman" from the shipped miniature model through a real ComfyUI server.

Starts ComfyUI with this pack, runs the workflow 'SPM - Miniature world 1' (SPM Train Membrane on the miniature
model: models/spm/snowman.safetensors), then 'SPM - Miniature world 2' (SPM Load Membrane, before and
after at the same seeds) for five prompts: the target, a synonym, two unrelated prompts and one
that combines the target with another concept. Writes to OUT_DIR (default out/demo/):
  miniworld_grid.png  rows = prompts; left: before, right: after, each with the classifier's
                      verdict; the gates the membrane used on each row
  gates.txt           the same numbers as text
usage: python scripts/demo.py COMFYUI_ROOT [OUT_DIR]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository, for lab
from lab.comfy_server import ComfyServer, shipped_workflow, workflow_to_api  # noqa: E402
from lab.host import REPO, use_host  # noqa: E402

ROWS = [("a snowman", "target"), ("a frosty", "synonym"), ("a red circle", "unrelated"), ("a tree", "unrelated"),
        ("a striped snowman", "target + stripes")]
PER_ROW = 4


def run_workflow(server, name: str, info: dict, edit=None):
    prompt = workflow_to_api(shipped_workflow(name), info)
    if edit:
        edit(prompt)
    entry, events = server.run_with_events(prompt, timeout=900)
    if entry["status"]["status_str"] != "success":
        raise SystemExit(f"{name} failed: {entry['status']}\n{server.log_tail()}")
    return entry, events


def main(comfy_root: str, out_dir: str) -> None:
    use_host(comfy_root)
    from PIL import Image

    started = time.time()
    os.makedirs(out_dir, exist_ok=True)
    base = tempfile.mkdtemp(prefix="spm-demo-")
    print("starting ComfyUI ...", flush=True)
    with ComfyServer(comfy_root, base) as server:
        print("training the snowman membrane with SPM Train Membrane (workflow 'SPM - Miniature world 1') ...", flush=True)
        run_workflow(server, "miniworld_train", server.object_info())
        info = server.object_info()  # now lists models/spm/snowman.safetensors
        rows = []
        for text, role in ROWS:
            print(f"sampling '{text}' before and after (workflow 'SPM - Miniature world 2') ...", flush=True)

            def edit(prompt, text=text):
                for node in prompt.values():
                    if node["class_type"] == "SPMTextEncode" and node["inputs"]["text"]:
                        node["inputs"]["text"] = text
                    if node["class_type"] == "EmptyLatentImage":
                        node["inputs"]["batch_size"] = PER_ROW

            entry, events = run_workflow(server, "miniworld_erase", info, edit)
            images = {}
            for output in entry["outputs"].values():
                for image in output.get("images", []):
                    side = "after" if image["filename"].startswith("miniworld_after") else "before"
                    images.setdefault(side, []).append(Image.open(
                        os.path.join(base, "output", image["subfolder"], image["filename"])).convert("RGB"))
            gates = next(m for e in events if e["type"] == "spm.gates" for m in e["data"]["membranes"])
            rows.append((text, role, images["before"], images["after"], gates))
    shutil.rmtree(base, ignore_errors=True)
    grid, lines = compose(rows)
    grid.save(os.path.join(out_dir, "miniworld_grid.png"))
    with open(os.path.join(out_dir, "gates.txt"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out_dir}/miniworld_grid.png and {out_dir}/gates.txt in {time.time() - started:.0f} s")


def compose(rows):
    """The grid image and its text: one row per prompt, before | after, verdicts and gates."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from miniworld.classifier import classify, load_classifier
    from miniworld.model import CLASSIFIER_FILE, UPSCALE

    classifier = load_classifier(CLASSIFIER_FILE)
    side, gap, label_width, header, caption = 128, 6, 190, 34, 16
    width = label_width + 2 * PER_ROW * (side + gap) + 3 * gap
    height = header + len(rows) * (side + caption + 14)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    left_x = label_width
    right_x = label_width + PER_ROW * (side + gap) + 3 * gap
    draw.text((left_x, 8), "before: the miniature model as shipped", fill="black")
    draw.text((right_x, 8), "after: + snowman membrane (SPM Load Membrane), same seeds", fill="black")
    draw.line([(right_x - 2 * gap, header - 6), (right_x - 2 * gap, height)], fill=(160, 160, 160), width=2)
    lines = ["Snowman membrane (trained by SPM Train Membrane on the miniature model), transport 'paper'.",
             f"{'prompt':<20} {'role':<17} {'gate +':>6} {'gate -':>6}  classifier before -> after"]
    for index, (text, role, before, after, gates) in enumerate(rows):
        y = header + index * (side + caption + 14)
        draw.text((6, y + 30), f'"{text}"', fill="black")
        draw.text((6, y + 48), role, fill=(90, 90, 90))
        draw.text((6, y + 72), f"gate, positive row: {gates['positive']:.2f}", fill=(20, 70, 160))
        draw.text((6, y + 88), f"gate, negative row: {gates['negative']:.2f}", fill=(20, 70, 160))
        verdicts = {}
        for name, frames, x0 in (("before", before, left_x), ("after", after, right_x)):
            pictures = torch.stack([torch.from_numpy(np.asarray(f, dtype=np.float32)[UPSCALE // 2::UPSCALE, UPSCALE // 2::UPSCALE]
                                                     / 255).permute(2, 0, 1) for f in frames])
            verdicts[name] = [v.label() for v in classify(classifier, pictures)]
            for column, (frame, label) in enumerate(zip(frames, verdicts[name])):
                x = x0 + column * (side + gap)
                grid.paste(frame.resize((side, side), Image.NEAREST), (x, y))
                draw.text((x + 2, y + side + 1), label, fill="black")
        lines.append(f"{text:<20} {role:<17} {gates['positive']:>6.2f} {gates['negative']:>6.2f}  "
                     f"{', '.join(verdicts['before'])} -> {', '.join(verdicts['after'])}")
    return grid, lines


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2] if len(sys.argv) > 2 else os.path.join(REPO, "out", "demo")))
