"""SPM Save as LoRA and SPM Merge into Model: the membranes at a fixed strength, no gating."""

from __future__ import annotations

import os

import comfy.lora
import folder_paths
from comfy_api.latest import io

from ..spm_core.errors import SPMError
from ..spm_core.file_format import is_text_token_layer, lora_tensors, save_membrane
from ..spm_core.membrane import bake
from . import paths
from .runtime import membrane_layers_of, state_of, without_membranes


def baked(model, name: str):
    """The model's membranes as one static membrane; refused for membranes on Flux single blocks, whose
    update a weight cannot confine to the text tokens."""
    state = state_of(model)
    masked = [entry.membrane.name for entry in state.entries if any(map(is_text_token_layer, entry.membrane.layers))]
    if masked:
        raise SPMError(f"{', '.join(masked)}: adapts Flux single blocks on the text tokens only, which a plain LoRA or "
                       "merged weights cannot express (they would change the image tokens too). Train it with "
                       "single_blocks off for a membrane that can be baked")
    return bake([(entry.membrane, entry.strength) for entry in state.entries], name)


class SaveSPMAsLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SPMSaveAsLoRA",
            display_name="SPM Save as LoRA",
            category="advanced/model_merging",
            description="Writes the model's membranes, at their strengths, as one plain LoRA file for A1111/Forge and "
                        "stock loaders (no Facilitated Transport: always open).",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="A model with membranes (from SPM Load Membrane)."),
                io.String.Input("filename", default="spm_baked",
                                tooltip="File name under models/loras (letters, digits, - and _; .safetensors is added)."),
                io.Boolean.Input("overwrite", default=False, optional=True,  # added later: optional for older workflows
                                 tooltip="Replace a file of that name if there is one. Off: an existing file is never touched."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the LoRA was written.")],
        )

    @classmethod
    def execute(cls, model, filename, overwrite=False) -> io.NodeOutput:
        stem = paths.safe_stem(filename)
        membrane = baked(model, stem)
        folder = folder_paths.get_folder_paths("loras")[0]
        path = os.path.join(folder, stem + ".safetensors")
        paths.refuse_to_replace(path, overwrite)
        os.makedirs(folder, exist_ok=True)
        save_membrane(path, membrane)
        return io.NodeOutput(path, ui={"text": [f"saved {path}"]})


class MergeSPMIntoModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SPMMergeIntoModel",
            display_name="SPM Merge into Model",
            category="advanced/model_merging",
            description="Patches the membranes into the weights at their strengths (always open, no per-prompt gate). "
                        "Useful before saving a checkpoint.",
            inputs=[io.Model.Input("model", tooltip="A model with membranes (from SPM Load Membrane).")],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the membranes merged into its weights.")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        membrane = baked(model, "merged")
        membrane_layers_of(model)  # refuses models without transformer blocks with a clear message
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        patches = comfy.lora.load_lora(lora_tensors(membrane), key_map)
        merged = without_membranes(model)
        merged.add_patches(patches, 1.0)
        return io.NodeOutput(merged)
