"""The demo: a membrane applied through a real ComfyUI server, before/after on the same seed, and
the gates it used.

Makes the tiny SD1.5 checkpoint and three membranes (random weights: this shows the machinery,
not a trained eraser), starts ComfyUI with this pack, runs workflows/before_after.json and
workflows/inspector.json, and writes to out/demo/:
  before_after.png   the two images side by side (left: no membrane, right: membrane)
  gates.txt          the gates the sampler used, and the inspector's table for two prompts
usage: python scripts/demo.py COMFYUI_ROOT [OUT_DIR]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(comfy_root: str, out_dir: str) -> None:
    sys.path[:0] = [comfy_root, REPO]
    from comfy.cli_args import args

    args.cpu = True
    from PIL import Image

    from scripts.comfy_server import ComfyServer, load_workflow, workflow_to_api
    from scripts.tiny_assets import install_assets

    os.makedirs(out_dir, exist_ok=True)
    base = tempfile.mkdtemp(prefix="spm-demo-")
    print("making the tiny checkpoint and membranes ...", flush=True)
    install_assets(os.path.join(base, "models"))
    print("starting ComfyUI ...", flush=True)
    with ComfyServer(comfy_root, base) as server:
        info = server.object_info()
        prompt = workflow_to_api(load_workflow(os.path.join(REPO, "workflows", "before_after.json")), info)
        print("running workflows/before_after.json ...", flush=True)
        entry, events = server.run_with_events(prompt)
        if entry["status"]["status_str"] != "success":
            raise SystemExit(f"the workflow failed: {entry['status']}\n{server.log_tail()}")
        images = [image for output in entry["outputs"].values() for image in output.get("images", [])]
        frames = [Image.open(os.path.join(base, "output", i["subfolder"], i["filename"])) for i in images]
        pair = frames[0] if len(frames) == 1 else _side_by_side(frames)
        pair.save(os.path.join(out_dir, "before_after.png"))
        used = [event["data"] for event in events if event["type"] == "spm.gates"]

        inspector = workflow_to_api(load_workflow(os.path.join(REPO, "workflows", "inspector.json")), info)
        table = next(o["text"][0] for o in server.run(inspector)["outputs"].values() if "text" in o)

    lines = ["Gates used while sampling 'snoopy sitting on a red doghouse' (rows: CFG positive / negative):"]
    for report in used[-1:]:
        for membrane in report["membranes"]:
            lines.append(f"  {membrane['membrane']:<12} concepts={membrane['concepts']} "
                         f"positive={membrane.get('positive')} negative={membrane.get('negative')}")
    lines += ["", "SPM Transport Inspector (workflows/inspector.json):", table]
    text = "\n".join(lines)
    with open(os.path.join(out_dir, "gates.txt"), "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    shutil.rmtree(base, ignore_errors=True)
    print(text)
    print(f"\nwrote {out_dir}/before_after.png (before | after | difference) and {out_dir}/gates.txt")


def _side_by_side(frames):
    """before | after | where they differ (amplified), each with a caption."""
    import numpy as np
    from PIL import Image, ImageChops, ImageDraw

    before, after = (frame.convert("RGB") for frame in frames[:2])
    difference = Image.fromarray(np.clip(np.asarray(ImageChops.difference(before, after), dtype=np.float32) * 4, 0, 255)
                                 .astype(np.uint8))
    panels = [("before (no membrane)", before), ("after (membrane, same seed)", after), ("|difference| x4", difference)]
    width, height = before.size
    canvas = Image.new("RGB", (len(panels) * (width + 8) - 8, height + 20), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (caption, panel) in enumerate(panels):
        canvas.paste(panel, (index * (width + 8), 20))
        draw.text((index * (width + 8) + 4, 4), caption, fill="black")
    return canvas


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2] if len(sys.argv) > 2 else os.path.join(REPO, "out", "demo")))
