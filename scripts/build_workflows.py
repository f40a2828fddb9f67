"""Writes the UI-format workflows in workflows/ (what a user drags into ComfyUI).

The JSON files are the product; this script only keeps their layout consistent. Run it after
changing a node's inputs: python scripts/build_workflows.py
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(HERE), "workflows")

# type -> (linked inputs [(name, type)], outputs [(name, type)])
SOCKETS = {
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "SPMLoader": ([("model", "MODEL"), ("clip", "CLIP")], [("model", "MODEL")]),
    "SPMTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "ImageBatch": ([("image1", "IMAGE"), ("image2", "IMAGE")], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], []),
    "PreviewImage": ([("images", "IMAGE")], []),
    "SPMTransportInspector": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
                              [("table", "STRING"), ("image", "IMAGE")]),
    "SPMTrain": ([("model", "MODEL"), ("clip", "CLIP")], [("model", "MODEL"), ("loss", "IMAGE"), ("path", "STRING")]),
    "SPMExampleLoadMiniatureWorld": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "Note": ([], []),
}


class Workflow:
    def __init__(self) -> None:
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, node_type: str, pos: tuple[int, int], widgets: list, title: str | None = None, **inputs) -> int:
        node_id = len(self.nodes) + 1
        sockets, outputs = SOCKETS[node_type]
        node = {
            "id": node_id, "type": node_type, "pos": list(pos), "size": [320, 130], "flags": {}, "order": node_id - 1,
            "mode": 0, "inputs": [], "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                                                for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": node_type}, "widgets_values": widgets,
        }
        if title:
            node["title"] = title
        for name, socket_type in sockets:
            source = inputs.get(name)
            link_id = None
            if source is not None:
                source_id, slot = source
                link_id = len(self.links) + 1
                self.links.append([link_id, source_id, slot, node_id, len(node["inputs"]), socket_type])
                self.nodes[source_id - 1]["outputs"][slot]["links"].append(link_id)
            node["inputs"].append({"name": name, "type": socket_type, "link": link_id})
        self.nodes.append(node)
        return node_id

    def save(self, name: str) -> None:
        document = {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                    "links": self.links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
                    "version": 0.4}
        with open(os.path.join(OUT, name), "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=1, ensure_ascii=False)
            handle.write("\n")


CHECKPOINT = "tiny-sd15.safetensors"
SAMPLER = ["euler", "normal", 1.0]
NOTE = ("Set up for the pack's tiny test checkpoint (random weights; bash scripts/demo.sh makes it). "
        "With a real SD1.5 checkpoint use 512x512 and 20-30 steps, and pick your own membranes in Load SPM. "
        "SPM Text Encode records token ids so the paper's token-overlap gate works; "
        "plain CLIP Text Encode also works (cosine gate only).")


def spm(flow, pos, model, checkpoint, membrane, transport="paper", strength=1.0):
    """A Load SPM fed by `model` (a Load SPM or the checkpoint: MODEL is output 0 of both)."""
    return flow.add("SPMLoader", pos, [membrane, strength, transport, "positive only", 0.0, 1.0, 0.0],
                    model=(model, 0), clip=(checkpoint, 1))


def sampler(flow, pos, model, positive, negative, latent, seed=42, title=None):
    return flow.add("KSampler", pos, [seed, "fixed", 6, 6.0, *SAMPLER], title=title, model=(model, 0),
                    positive=(positive, 0), negative=(negative, 0), latent_image=(latent, 0))


def base(flow, prompt):
    checkpoint = flow.add("CheckpointLoaderSimple", (0, 0), [CHECKPOINT])
    positive = flow.add("SPMTextEncode", (400, 300), [prompt], title="Positive (SPM Text Encode)", clip=(checkpoint, 1))
    negative = flow.add("SPMTextEncode", (400, 500), ["blurry, low quality"], title="Negative", clip=(checkpoint, 1))
    latent = flow.add("EmptyLatentImage", (400, 700), [256, 256, 1])
    flow.add("Note", (0, 300), [NOTE], title="About this workflow")
    return checkpoint, positive, negative, latent


def erase_one_concept() -> None:
    flow = Workflow()
    checkpoint, positive, negative, latent = base(flow, "snoopy sitting on a red doghouse")
    model = spm(flow, (400, 0), checkpoint, checkpoint, "snoopy.safetensors")
    samples = sampler(flow, (800, 0), model, positive, negative, latent)
    image = flow.add("VAEDecode", (1200, 0), [], samples=(samples, 0), vae=(checkpoint, 2))
    flow.add("SaveImage", (1500, 0), ["spm_erase_one"], images=(image, 0))
    flow.save("erase_one_concept.json")


def chain_three_membranes() -> None:
    flow = Workflow()
    checkpoint, positive, negative, latent = base(flow, "mickey mouse and snoopy in a van gogh painting")
    model = checkpoint
    for index, membrane in enumerate(("snoopy.safetensors", "mickey_mouse.safetensors", "van_gogh.safetensors")):
        model = spm(flow, (400 + 360 * index, -200), model, checkpoint, membrane)
    samples = sampler(flow, (1500, 0), model, positive, negative, latent)
    image = flow.add("VAEDecode", (1900, 0), [], samples=(samples, 0), vae=(checkpoint, 2))
    flow.add("SaveImage", (2200, 0), ["spm_chain_three"], images=(image, 0))
    flow.save("chain_three_membranes.json")


def before_after() -> None:
    flow = Workflow()
    checkpoint, positive, negative, latent = base(flow, "snoopy sitting on a red doghouse")
    model = spm(flow, (400, -200), checkpoint, checkpoint, "snoopy.safetensors")
    before = sampler(flow, (800, 200), checkpoint, positive, negative, latent, title="Before (no membrane)")
    after = sampler(flow, (800, -200), model, positive, negative, latent, title="After (same seed, membrane)")
    before_image = flow.add("VAEDecode", (1200, 200), [], samples=(before, 0), vae=(checkpoint, 2))
    after_image = flow.add("VAEDecode", (1200, -200), [], samples=(after, 0), vae=(checkpoint, 2))
    pair = flow.add("ImageBatch", (1500, 0), [], image1=(before_image, 0), image2=(after_image, 0))
    flow.add("SaveImage", (1800, 0), ["spm_before_after"], images=(pair, 0))
    flow.save("before_after.json")


def inspector() -> None:
    flow = Workflow()
    checkpoint, positive, negative, _ = base(flow, "snoopy sitting on a red doghouse")
    model = spm(flow, (400, -200), checkpoint, checkpoint, "snoopy.safetensors")
    model = spm(flow, (760, -200), model, checkpoint, "van_gogh.safetensors", transport="calibrated")
    table = flow.add("SPMTransportInspector", (1150, 0), [], model=(model, 0), positive=(positive, 0),
                     negative=(negative, 0))
    flow.add("PreviewImage", (1500, 0), [], images=(table, 1))
    flow.save("inspector.json")


def train_then_apply() -> None:
    flow = Workflow()
    checkpoint, positive, negative, latent = base(flow, "snoopy sitting on a red doghouse")
    flow.add("Note", (0, 560), ["Training settings are sized for the tiny test checkpoint on a CPU. For a real "
                                "checkpoint: 500-3000 iterations, rollout_steps 30, latent_size 64 (SD1.5) / 96 (SD2) / 128 (SDXL)."],
             title="Training settings")
    trained = flow.add("SPMTrain", (400, -420), ["snoopy", "", "", 8, 1e-3, 1, 1.0, 1000.0, 2, "prompts", 1.0, 4, 8, 0,
                                                 "fixed", "snoopy_trained", False, False],
                       model=(checkpoint, 0), clip=(checkpoint, 1))
    flow.add("PreviewImage", (800, -420), [], title="Loss curve", images=(trained, 1))
    before = sampler(flow, (800, 200), checkpoint, positive, negative, latent, title="Before (no membrane)")
    after = sampler(flow, (800, -200), trained, positive, negative, latent, title="After (trained membrane)")
    before_image = flow.add("VAEDecode", (1200, 200), [], samples=(before, 0), vae=(checkpoint, 2))
    after_image = flow.add("VAEDecode", (1200, -200), [], samples=(after, 0), vae=(checkpoint, 2))
    pair = flow.add("ImageBatch", (1500, 0), [], image1=(before_image, 0), image2=(after_image, 0))
    flow.add("SaveImage", (1800, 0), ["spm_train_then_apply"], images=(pair, 0))
    flow.save("train_then_apply.json")


MINIWORLD_NOTE = ("The miniature world shipped with the pack: a small SD1-class model trained on drawn shapes (circle, "
                  "square, triangle, cross), colours (red, green, blue, yellow, purple), characters (snowman, house, tree, "
                  "mushroom) and stripes. Pictures are 16x16, shown at 128x128. Try prompts such as 'a red circle', "
                  "'a striped snowman', 'a frosty' (a synonym).")
MINIWORLD_SAMPLER = [1, "fixed", 20, 5.0, "euler", "normal", 1.0]


def miniworld_train() -> None:
    """Train SPM on the miniature model: a snowman membrane in about a minute and a half on a CPU
    (settings of miniworld.lab.MembraneSettings)."""
    flow = Workflow()
    world = flow.add("SPMExampleLoadMiniatureWorld", (0, 0), [])
    flow.add("Note", (0, 200), [MINIWORLD_NOTE], title="About the miniature world")
    trained = flow.add("SPMTrain", (400, 0), ["snowman", "", "", 200, 1e-2, 1, 1.0, 10.0, 2, "prompts", 1.0, 20, 16, 0,
                                              "fixed", "snowman", False, False], model=(world, 0), clip=(world, 1))
    flow.add("PreviewImage", (800, 0), [], title="Loss curve", images=(trained, 1))
    flow.save("miniworld_train.json")


def miniworld_erase() -> None:
    """Before / after on the miniature model with the membrane miniworld_train.json saved."""
    flow = Workflow()
    world = flow.add("SPMExampleLoadMiniatureWorld", (0, 0), [])
    flow.add("Note", (0, 200), [MINIWORLD_NOTE + " Run miniworld_train.json first: it saves models/spm/snowman.safetensors."],
             title="About the miniature world")
    model = flow.add("SPMLoader", (400, -250), ["snowman.safetensors", 1.0, "paper", "positive only", 0.0, 1.0, 0.0],
                     model=(world, 0), clip=(world, 1))
    positive = flow.add("SPMTextEncode", (400, 100), ["a striped snowman"], title="Positive (SPM Text Encode)", clip=(world, 1))
    negative = flow.add("SPMTextEncode", (400, 300), [""], title="Negative", clip=(world, 1))
    latent = flow.add("EmptyLatentImage", (400, 500), [128, 128, 4])
    after = flow.add("KSampler", (800, -250), MINIWORLD_SAMPLER, title="After (membrane)", model=(model, 0),
                     positive=(positive, 0), negative=(negative, 0), latent_image=(latent, 0))
    before = flow.add("KSampler", (800, 250), MINIWORLD_SAMPLER, title="Before (no membrane, same seed)", model=(world, 0),
                      positive=(positive, 0), negative=(negative, 0), latent_image=(latent, 0))
    after_image = flow.add("VAEDecode", (1200, -250), [], samples=(after, 0), vae=(world, 2))
    before_image = flow.add("VAEDecode", (1200, 250), [], samples=(before, 0), vae=(world, 2))
    flow.add("SaveImage", (1500, -250), ["miniworld_after"], images=(after_image, 0))
    flow.add("SaveImage", (1500, 250), ["miniworld_before"], images=(before_image, 0))
    flow.save("miniworld_erase.json")


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    for build in (erase_one_concept, chain_three_membranes, before_after, inspector, train_then_apply,
                  miniworld_train, miniworld_erase):
        build()
    print("workflows written to", OUT)
