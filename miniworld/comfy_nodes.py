"""The miniature world's loader node, in its own "SPM examples" category: not part of the pack's
product nodes, which never import this folder."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

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


EXAMPLE_NODES = [LoadMiniatureWorld]
