"""Writes the UI-format workflows in workflows/ (what a user drags into ComfyUI, and what the
template browser lists with the file name as its title and `<name>.jpg` as its thumbnail).

The JSON files are the product; this script keeps their widget slots, sizes and layout right.
Run it after changing a node's inputs: python scripts/build_workflows.py

The SD1.5 and Flux workflows name the checkpoints ComfyUI's own SD1.5 and Flux.1-dev templates use
(with their download addresses, so the frontend offers them when missing); the tests swap in their tiny
checkpoint, and the miniature DiT for Flux (lab/comfy_server.py: for_test_models).
"""

from __future__ import annotations

import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT = os.path.join(REPO, "workflows")
TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its position
GAP = 40

with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as _handle:
    _project = dict(re.findall(r'^(name|version) = "([^"]+)"$', _handle.read(), re.MULTILINE))
PACK = {"cnr_id": _project["name"], "ver": _project["version"]}  # the registry id the Manager installs from
CORE = {"cnr_id": "comfy-core", "ver": "0.3.75"}
OURS = {"SPMLoader", "SPMTextEncode", "SPMTransportInspector", "SPMSaveAsLoRA", "SPMMergeIntoModel", "SPMTrain",
        "SPMExampleLoadMiniatureWorld", "SPMExampleLoadMiniatureDiT"}

# type -> (linked inputs [(name, type)], outputs [(name, type)], size [w, h] at least the frontend's computeSize)
NODES = {
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], [320, 98]),
    "SPMLoader": ([("model", "MODEL"), ("clip", "CLIP")], [("model", "MODEL")], [320, 360]),
    "SPMTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")], [400, 150]),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")], [320, 106]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [("LATENT", "LATENT")], [320, 262]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")], [210, 46]),
    "ImageBatch": ([("image1", "IMAGE"), ("image2", "IMAGE")], [("IMAGE", "IMAGE")], [210, 46]),
    "SaveImage": ([("images", "IMAGE")], [], [400, 420]),
    "PreviewImage": ([("images", "IMAGE")], [], [400, 300]),
    "SPMTransportInspector": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                               ("latent", "LATENT")], [("table", "STRING"), ("image", "IMAGE")], [320, 130]),
    "SPMTrain": ([("model", "MODEL"), ("clip", "CLIP")], [("model", "MODEL"), ("loss", "IMAGE"), ("path", "STRING")],
                 [360, 842]),
    "SPMExampleLoadMiniatureWorld": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], [320, 66]),
    "SPMExampleLoadMiniatureDiT": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], [320, 66]),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")], [320, 58]),
    "EmptySD3LatentImage": ([], [("LATENT", "LATENT")], [320, 106]),
    "MarkdownNote": ([], [], [400, 260]),
}


# SPM Train Membrane's later inputs at their defaults: stop_at_erasure, adversaries, adversary_tokens,
# adversary_every, adversary_steps, contexts, rollout_cfg (0: as the model is sampled), gradient_checkpointing,
# single_blocks
LATER_TRAIN_INPUTS = [0.0, 0, 3, 20, 20, 2, 0.0, False, False]
ROLLOUT_CFG_INPUT = -3  # where rollout_cfg sits in LATER_TRAIN_INPUTS


class Workflow:
    def __init__(self) -> None:
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.models: list[dict] = []

    def add(self, node_type: str, pos: tuple[int, int], widgets: list, title: str | None = None,
            height: int | None = None, **inputs) -> int:
        node_id = len(self.nodes) + 1
        sockets, outputs, size = NODES[node_type]
        properties = {"Node name for S&R": node_type, **(PACK if node_type in OURS else CORE)}
        if node_type == "MarkdownNote":
            properties = {}
        node = {
            "id": node_id, "type": node_type, "pos": list(pos), "size": [size[0], height or size[1]], "flags": {},
            "order": node_id - 1, "mode": 0, "inputs": [],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
            "properties": properties, "widgets_values": widgets,
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

    def below(self, node_id: int) -> int:
        """The y where a node placed under `node_id` starts (title bar and a gap included)."""
        node = self.nodes[node_id - 1]
        return node["pos"][1] + node["size"][1] + TITLE_HEIGHT + GAP

    def save(self, name: str) -> None:
        check_layout(name, self.nodes)
        document = {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                    "links": self.links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.7, "offset": [40, 80]}},
                    "version": 0.4}
        if self.models:
            document["models"] = self.models
        with open(os.path.join(OUT, name + ".json"), "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=1, ensure_ascii=False)
            handle.write("\n")


def check_layout(name: str, nodes: list[dict]) -> None:
    """No two nodes (title bars included) may overlap."""
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in nodes]
    for index, (a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for b, bx0, by0, bx1, by1 in boxes[index + 1:]:
            if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
                raise ValueError(f"{name}: nodes {a} and {b} overlap")


SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SD15_MODEL = {"name": SD15, "directory": "checkpoints",
              "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
                     "v1-5-pruned-emaonly-fp16.safetensors?download=true"}
SD15_SAMPLER = ["dpmpp_2m", "karras", 1.0]
SD15_NOTE = (f"## {{title}}\n\n{{what}}\n\n**Checkpoint:** Stable Diffusion 1.5 (`{SD15}` in `models/checkpoints`; "
             "any SD1.5 fine-tune works too: membranes transfer without retraining). 512x512, 25 steps.\n\n"
             "**Membranes:** put SPM files in `models/spm` (or SPM-tagged files in `models/loras`) and pick them in "
             "SPM Load Membrane; the names here are examples.\n\n"
             "**No checkpoint at hand?** Open *SPM - Miniature world* from the templates: it runs on the small model "
             "shipped with the pack. Or swap Load Checkpoint for *SPM Example: Load Miniature World*, set the latent "
             "to 128x128 and use its concepts (snowman, circle, red, striped, ...).")


def spm(flow, pos, model, clip, membrane, transport="paper", strength=1.0):
    """An SPM Load Membrane fed by `model` (an SPM Load Membrane or a loader: MODEL is output 0 of both)."""
    return flow.add("SPMLoader", pos, [membrane, strength, transport, "positive only", 0.0, 1.0, 0.0, 1.0, "constant"],
                    model=(model, 0), clip=(clip, 1))


def sampler(flow, pos, model, positive, negative, latent, widgets, title=None):
    return flow.add("KSampler", pos, widgets, title=title, model=(model, 0), positive=(positive, 0),
                    negative=(negative, 0), latent_image=(latent, 0))


def sd15_base(flow, title, what, prompt, x=400, y=400, with_latent=True):
    """Load Checkpoint and its note in the first column; prompts and the latent in the column at x, from y."""
    flow.models.append(SD15_MODEL)
    checkpoint = flow.add("CheckpointLoaderSimple", (0, 0), [SD15])
    flow.nodes[-1]["properties"]["models"] = [SD15_MODEL]
    flow.add("MarkdownNote", (0, flow.below(checkpoint)), [SD15_NOTE.format(title=title, what=what)],
             title="About this workflow", height=420)
    positive = flow.add("SPMTextEncode", (x, y), [prompt], title="Positive (SPM Text Encode)", clip=(checkpoint, 1))
    negative = flow.add("SPMTextEncode", (x, flow.below(positive)), ["blurry, low quality"], title="Negative",
                        clip=(checkpoint, 1))
    latent = flow.add("EmptyLatentImage", (x, flow.below(negative)), [512, 512, 1]) if with_latent else None
    return checkpoint, positive, negative, latent


def save_side_by_side(flow, x, before, after, checkpoint, prefix):
    """Both samplers' latents decoded, batched before-then-after and saved, in one column at x."""
    after_image = flow.add("VAEDecode", (x, 0), [], samples=(after, 0), vae=(checkpoint, 2))
    before_image = flow.add("VAEDecode", (x, flow.below(after_image)), [], samples=(before, 0), vae=(checkpoint, 2))
    pair = flow.add("ImageBatch", (x, flow.below(before_image)), [], title="Before, after",
                    image1=(before_image, 0), image2=(after_image, 0))
    flow.add("SaveImage", (x, flow.below(pair)), [prefix], images=(pair, 0))


def save_after_and_before(flow, x, after, before, loader, prefix):
    """Both samplers' latents decoded in a column at x and saved separately (`<prefix>_after`,
    `<prefix>_before`) in the column beside it: the miniature models' pictures are small enough to show both."""
    after_image = flow.add("VAEDecode", (x, 0), [], samples=(after, 0), vae=(loader, 2))
    before_image = flow.add("VAEDecode", (x, flow.below(after_image)), [], samples=(before, 0), vae=(loader, 2))
    saved = flow.add("SaveImage", (x + 260, 0), [f"{prefix}_after"], title="After", images=(after_image, 0))
    flow.add("SaveImage", (x + 260, flow.below(saved)), [f"{prefix}_before"], title="Before", images=(before_image, 0))


def sd15_sampler(seed=42):
    return [seed, "fixed", 25, 7.0, *SD15_SAMPLER]


def erase_one_concept() -> None:
    flow = Workflow()
    title = "SPM - Erase one concept (SD1.5)"
    checkpoint, positive, negative, latent = sd15_base(
        flow, title, "One membrane erases its concept: prompts near it come out without it, other prompts are "
                     "untouched (the gate stays closed).", "snoopy sitting on a red doghouse")
    model = spm(flow, (400, 0), checkpoint, checkpoint, "snoopy.safetensors")
    samples = sampler(flow, (840, 0), model, positive, negative, latent, sd15_sampler())
    image = flow.add("VAEDecode", (1200, 0), [], samples=(samples, 0), vae=(checkpoint, 2))
    flow.add("SaveImage", (1200, flow.below(image)), ["spm_erase_one"], images=(image, 0))
    flow.save(title)


def chain_three_membranes() -> None:
    flow = Workflow()
    title = "SPM - Chain three membranes (SD1.5)"
    checkpoint, positive, negative, latent = sd15_base(
        flow, title, "Three SPM Load Membrane in a chain erase three concepts at once; each opens only for prompts near its "
                     "own concept.", "mickey mouse and snoopy in a van gogh painting", x=1160)
    model = checkpoint
    for index, membrane in enumerate(("snoopy.safetensors", "mickey_mouse.safetensors", "van_gogh.safetensors")):
        model = spm(flow, (400 + 380 * index, 0), model, checkpoint, membrane)
    samples = sampler(flow, (1600, 0), model, positive, negative, latent, sd15_sampler())
    image = flow.add("VAEDecode", (1960, 0), [], samples=(samples, 0), vae=(checkpoint, 2))
    flow.add("SaveImage", (1960, flow.below(image)), ["spm_chain_three"], images=(image, 0))
    flow.save(title)


def before_after() -> None:
    flow = Workflow()
    title = "SPM - Before and after (SD1.5)"
    checkpoint, positive, negative, latent = sd15_base(
        flow, title, "The same prompt and seed without and with the membrane, side by side.",
        "snoopy sitting on a red doghouse")
    model = spm(flow, (400, 0), checkpoint, checkpoint, "snoopy.safetensors")
    after = sampler(flow, (840, 0), model, positive, negative, latent, sd15_sampler(), title="After (membrane)")
    before = sampler(flow, (840, flow.below(after)), checkpoint, positive, negative, latent, sd15_sampler(),
                     title="Before (no membrane, same seed)")
    save_side_by_side(flow, 1200, before, after, checkpoint, "spm_before_after")
    flow.save(title)


def inspector() -> None:
    flow = Workflow()
    title = "SPM - Inspect the gates (SD1.5)"
    checkpoint, positive, negative, _ = sd15_base(
        flow, title, "SPM Transport Inspector shows how far each membrane of a chain opens for the prompts, without "
                     "sampling.", "snoopy sitting on a red doghouse", with_latent=False)
    model = spm(flow, (400, 0), checkpoint, checkpoint, "snoopy.safetensors")
    model = spm(flow, (780, 0), model, checkpoint, "van_gogh.safetensors", transport="calibrated")
    table = flow.add("SPMTransportInspector", (1160, 0), [0, "fixed"], model=(model, 0), positive=(positive, 0),
                     negative=(negative, 0))
    flow.add("PreviewImage", (1160, flow.below(table)), [], title="Gate table", images=(table, 1))
    flow.save(title)


def train_then_apply() -> None:
    flow = Workflow()
    title = "SPM - Train, then apply (SD1.5)"
    checkpoint, positive, negative, latent = sd15_base(
        flow, title, "SPM Train Membrane erases a concept from this checkpoint (Latent Anchoring keeps the rest), saves "
                     "`models/spm/snoopy_trained.safetensors` and hands the model on with the new membrane; the "
                     "progress bar shows the time left. The paper trains 3000 iterations; this starts with 500. A "
                     "queue with unchanged settings does not retrain; an existing file is kept unless *overwrite* is on.",
        "snoopy sitting on a red doghouse", x=400, y=1000)
    trained = flow.add("SPMTrain", (400, 0), ["snoopy", "", "", 500, 1e-4, 1, 1.0, 1000.0, 2, "prompts", 1.0, 30, 64, 0,
                                              "fixed", "snoopy_trained", False, False, *LATER_TRAIN_INPUTS],
                       model=(checkpoint, 0), clip=(checkpoint, 1))
    after = sampler(flow, (840, 0), trained, positive, negative, latent, sd15_sampler(), title="After (trained membrane)")
    before = sampler(flow, (840, flow.below(after)), checkpoint, positive, negative, latent, sd15_sampler(),
                     title="Before (no membrane, same seed)")
    flow.add("PreviewImage", (840, flow.below(before)), [], title="Loss curve", images=(trained, 1))
    save_side_by_side(flow, 1300, before, after, checkpoint, "spm_train_then_apply")
    flow.save(title)


MINIWORLD_NOTE = ("## {title}\n\n{what}\n\nThe miniature world ships with the pack: a small SD1-class model trained "
                  "on drawn shapes (circle, square, triangle, cross), colours (red, green, blue, yellow, purple), "
                  "characters (snowman, house, tree, mushroom) and stripes. Pictures are 16x16, shown at 128x128. "
                  "Try prompts such as *a red circle*, *a striped snowman*, *a frosty* (a synonym).")
MINIWORLD_SAMPLER = [1, "fixed", 20, 5.0, "euler", "normal", 1.0]


def miniworld_train() -> None:
    """SPM Train Membrane on the miniature model: a snowman membrane in about a minute and a half on a CPU
    (settings of lab.harness.MembraneSettings)."""
    flow = Workflow()
    title = "SPM - Miniature world 1, train"
    world = flow.add("SPMExampleLoadMiniatureWorld", (0, 0), [])
    flow.add("MarkdownNote", (0, flow.below(world)), [MINIWORLD_NOTE.format(
        title=title, what="SPM Train Membrane erases *snowman* from the miniature model in about a minute and a half on a CPU "
                          "and saves `models/spm/snowman.safetensors`; then open *Miniature world 2*.")],
        title="About the miniature world")
    trained = flow.add("SPMTrain", (440, 0), ["snowman", "", "", 200, 1e-2, 1, 1.0, 10.0, 2, "prompts", 1.0, 20, 16, 0,
                                              "fixed", "snowman", False, False, *LATER_TRAIN_INPUTS], model=(world, 0), clip=(world, 1))
    flow.add("PreviewImage", (880, 0), [], title="Loss curve", images=(trained, 1))
    flow.save(title)


def miniworld_erase() -> None:
    """Before / after on the miniature model with the membrane the training workflow saved."""
    flow = Workflow()
    title = "SPM - Miniature world 2, erase"
    world = flow.add("SPMExampleLoadMiniatureWorld", (0, 0), [])
    flow.add("MarkdownNote", (0, flow.below(world)), [MINIWORLD_NOTE.format(
        title=title, what="The same prompt and seeds without and with the snowman membrane: the snowman goes, the "
                          "stripes stay. Run *Miniature world 1* first: it saves `models/spm/snowman.safetensors`.")],
        title="About the miniature world")
    model = spm(flow, (440, 0), world, world, "snowman.safetensors")
    positive = flow.add("SPMTextEncode", (440, flow.below(model)), ["a striped snowman"],
                        title="Positive (SPM Text Encode)", clip=(world, 1))
    negative = flow.add("SPMTextEncode", (440, flow.below(positive)), [""], title="Negative", clip=(world, 1))
    latent = flow.add("EmptyLatentImage", (440, flow.below(negative)), [128, 128, 4])
    after = sampler(flow, (880, 0), model, positive, negative, latent, MINIWORLD_SAMPLER, title="After (membrane)")
    before = sampler(flow, (880, flow.below(after)), world, positive, negative, latent, MINIWORLD_SAMPLER,
                     title="Before (no membrane, same seed)")
    save_after_and_before(flow, 1240, after, before, world, "miniworld")
    flow.save(title)


DIT_NOTE = ("## {title}\n\n{what}\n\nThe miniature DiT ships with the pack: the miniature world (shapes, colours, "
            "characters such as snowman, house, tree and mushroom, and stripes; 16x16 pictures shown at 128x128) drawn "
            "by a tiny Flux.1 built from ComfyUI's own classes, with Flux's text encoders (T5 and CLIP-L) at miniature "
            "size. It is not guidance-distilled: it is sampled with a negative prompt at cfg 5, without FluxGuidance.\n\n"
            "**Membranes on Flux** bind where the text enters (txt_in and the double blocks' text stream) and are gated "
            "with the `tokens` transport: SPM Train Membrane hands on the model behind it. To apply the saved file "
            "later, use SPM Load Membrane with transport `tokens` (the other gates are refused on Flux).")


def miniature_dit() -> None:
    """SPM Train Membrane on the miniature DiT (the miniature world's settings, lab.harness.MembraneSettings),
    then the same seed without and with the trained membrane. On Flux the node returns the model behind the
    `tokens` transport (nodes/train.py), so its output is sampled directly."""
    flow = Workflow()
    title = "SPM - Miniature DiT, train and erase"
    world = flow.add("SPMExampleLoadMiniatureDiT", (0, 0), [])
    flow.add("MarkdownNote", (0, flow.below(world)), [DIT_NOTE.format(
        title=title, what="SPM Train Membrane erases *snowman* from the miniature DiT (about a minute on a CPU) and saves "
                          "`models/spm/snowman_dit.safetensors`; the two samplers then draw *a striped snowman* with the "
                          "same seeds without and with the new membrane: the snowman goes, the stripes stay. This DiT is "
                          "sampled with CFG, so the training rolls out with CFG too (*rollout_cfg* 3; Flux.1 itself "
                          "rolls out at 1, which 0 picks).")],
        title="About the miniature DiT", height=300)
    later = list(LATER_TRAIN_INPUTS)
    later[ROLLOUT_CFG_INPUT] = 3.0  # sampled with CFG, unlike Flux.1: roll out with it (README, Flux.1 and Chroma)
    trained = flow.add("SPMTrain", (440, 0), ["snowman", "", "", 200, 1e-2, 1, 1.0, 10.0, 2, "prompts", 1.0, 20, 16, 0,
                                              "fixed", "snowman_dit", False, False, *later],
                       model=(world, 0), clip=(world, 1))
    positive = flow.add("SPMTextEncode", (840, 0), ["a striped snowman"], title="Positive (SPM Text Encode)",
                        clip=(world, 1))
    negative = flow.add("SPMTextEncode", (840, flow.below(positive)), [""], title="Negative", clip=(world, 1))
    latent = flow.add("EmptyLatentImage", (840, flow.below(negative)), [128, 128, 4])
    flow.add("PreviewImage", (840, flow.below(latent)), [], title="Loss curve", images=(trained, 1))
    after = sampler(flow, (1280, 0), trained, positive, negative, latent, MINIWORLD_SAMPLER,
                    title="After (trained membrane)")
    before = sampler(flow, (1280, flow.below(after)), world, positive, negative, latent, MINIWORLD_SAMPLER,
                     title="Before (no membrane, same seed)")
    save_after_and_before(flow, 1640, after, before, world, "miniature_dit")
    flow.save(title)


FLUX_DEV = "flux1-dev-fp8.safetensors"
FLUX_DEV_MODEL = {"name": FLUX_DEV, "directory": "checkpoints",  # as ComfyUI's Flux.1-dev template names it
                  "url": "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev-fp8.safetensors?download=true"}
FLUX_NOTE = (f"## {{title}}\n\n{{what}}\n\n**Checkpoint:** Flux.1-dev (`{FLUX_DEV}` in `models/checkpoints`, the "
             "checkpoint of ComfyUI's own Flux.1-dev template, text encoders and VAE included). 1024x1024, 20 steps, "
             "FluxGuidance 3.5 and cfg 1, so the negative prompt is ignored.\n\n"
             "**Flux membranes** are trained on Flux: SPM Train Membrane on this checkpoint (see *SPM - Train, then apply*) "
             "or `scripts/train_spm.py` saves one in `models/spm`. Erasure LoRAs of Flux's text layers (kohya, "
             "diffusers, PEFT or BFL names) load too. Membranes trained on SD1.5 or SDXL do not fit Flux and are "
             "refused. The name here is an example.\n\n"
             "**Transport `tokens`:** Flux reads T5 token vectors padded to 256 tokens, so whole prompts all look "
             "alike to a cosine; the gate looks for the concept's own tokens among the prompt's instead. `paper`, "
             "`cosine`, `calibrated` and `latent` are refused on Flux.\n\n"
             "**No checkpoint at hand?** Open *SPM - Miniature DiT, train and erase*: a tiny Flux shipped with the pack.")


def erase_one_concept_flux() -> None:
    flow = Workflow()
    title = "SPM - Erase one concept (Flux)"
    flow.models.append(FLUX_DEV_MODEL)
    checkpoint = flow.add("CheckpointLoaderSimple", (0, 0), [FLUX_DEV])
    flow.nodes[-1]["properties"]["models"] = [FLUX_DEV_MODEL]
    flow.add("MarkdownNote", (0, flow.below(checkpoint)), [FLUX_NOTE.format(
        title=title, what="One membrane erases its concept from Flux.1-dev: prompts that name it come out without it, "
                          "other prompts are untouched (the gate stays closed).")],
        title="About this workflow", height=440)
    model = spm(flow, (440, 0), checkpoint, checkpoint, "pikachu.safetensors", transport="tokens")
    positive = flow.add("SPMTextEncode", (440, flow.below(model)), ["pikachu sitting on a park bench, photo"],
                        title="Positive (SPM Text Encode)", clip=(checkpoint, 1))
    guided = flow.add("FluxGuidance", (440, flow.below(positive)), [3.5], conditioning=(positive, 0))
    negative = flow.add("SPMTextEncode", (440, flow.below(guided)), [""], title="Negative (ignored at cfg 1)",
                        clip=(checkpoint, 1))
    latent = flow.add("EmptySD3LatentImage", (440, flow.below(negative)), [1024, 1024, 1])
    samples = sampler(flow, (880, 0), model, guided, negative, latent, [42, "fixed", 20, 1.0, "euler", "simple", 1.0])
    image = flow.add("VAEDecode", (1240, 0), [], samples=(samples, 0), vae=(checkpoint, 2))
    flow.add("SaveImage", (1240, flow.below(image)), ["spm_erase_one_flux"], images=(image, 0))
    flow.save(title)


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    for build in (erase_one_concept, chain_three_membranes, before_after, inspector, train_then_apply,
                  miniworld_train, miniworld_erase, miniature_dit, erase_one_concept_flux):
        build()
    print("workflows written to", OUT)
