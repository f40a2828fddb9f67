"""The miniature world's loader node, in its own "SPM examples" category: not part of the pack's
product nodes, which never import this folder."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from . import dit
from .model import MODEL_FILE, load_world


class LoadMiniatureWorld(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SPMExampleLoadMiniatureWorld",
            display_name="SPM Example: Load Miniature World",
            category="SPM examples",
            description="The small SD1-class text-to-image model shipped with the SPM pack, trained on drawn shapes, "
                        "colours, characters and stripes (16x16 pictures shown at 128x128). Use EmptyLatentImage "
                        "128x128, KSampler (euler, 20 steps, cfg 5) and VAE Decode with the VAE it returns. SPM Load Membrane, "
                        "SPM Train Membrane (latent_size 16) and the Inspector work on it as on Stable Diffusion 1.5. "
                        "Textual-inversion embeddings for it (128 wide) in models/embeddings work as embedding:name.",
            inputs=[],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The miniature UNet (ComfyUI SD15 class)."),
                io.Clip.Output(display_name="CLIP", tooltip="Its text encoder (ComfyUI SD1 CLIP with the real tokenizer)."),
                io.Vae.Output(display_name="VAE", tooltip="Pixel-space VAE: the latent's RGB channels, upscaled 8x."),
            ],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(*load_world(MODEL_FILE, folder_paths.get_folder_paths("embeddings")))


class LoadMiniatureDiT(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SPMExampleLoadMiniatureDiT",
            display_name="SPM Example: Load Miniature DiT",
            category="SPM examples",
            description="The same miniature world drawn by a tiny Flux.1 (ComfyUI's Flux class: 2 double and 2 single "
                        "blocks, 128 wide) with Flux's own text encoders at miniature size (T5 and CLIP-L, the real "
                        "tokenizers; T5 prompts padded to 32 tokens). It is not guidance-distilled: sample it with "
                        "KSampler and a negative prompt (euler, 20 steps, cfg 5) on EmptyLatentImage 128x128, and decode "
                        "with the VAE it returns. SPM Load Membrane binds to it as to Flux.1 (transport: tokens).",
            inputs=[],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The miniature Flux (ComfyUI's Flux class, flow matching)."),
                io.Clip.Output(display_name="CLIP", tooltip="Its text encoders (ComfyUI's Flux CLIP: T5 and CLIP-L)."),
                io.Vae.Output(display_name="VAE", tooltip="Pixel-space VAE: the latent's RGB channels (Flux's latent "
                                                          "format), upscaled 8x."),
            ],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(*dit.load_world(dit.MODEL_FILE, folder_paths.get_folder_paths("embeddings")))


EXAMPLE_NODES = [LoadMiniatureWorld, LoadMiniatureDiT]
