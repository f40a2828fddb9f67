"""SPM Load Membrane and SPM Text Encode."""

from __future__ import annotations

from comfy_api.latest import io

from ..spm_core.errors import SPMError
from ..spm_core.file_format import load_membrane
from ..spm_core.ramp import Ramp
from ..spm_core.transport import TransportMode
from . import paths
from .encode import encode_with_tokens, transport_for
from .gating import MAX_STRENGTH, MembraneEntry, Rows
from .runtime import with_membrane

TRANSPORT_MODES = [mode.value for mode in TransportMode]


class LoadSPM(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SPMLoader",
            display_name="SPM Load Membrane (Concept Eraser)",
            category="loaders/spm",
            description="Adds a concept membrane to the model. Chain several to erase several concepts; "
                        "each opens only for prompts near its concept (Facilitated Transport).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to add the membrane to. It is not changed; "
                                                "a copy with the membrane comes out."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The text encoder your prompts use (with the same CLIP skip). It encodes the "
                                      "membrane's concepts for the gate; not needed with transport always_open."),
                io.Combo.Input("membrane", options=paths.membrane_choices(),
                               tooltip="Membrane file from models/spm (or an SPM file in models/loras)."),
                io.Float.Input("strength", default=1.0, min=-MAX_STRENGTH, max=MAX_STRENGTH, step=0.05,
                               tooltip="How strongly the membrane acts on the positive rows when fully open. 1 = as "
                                       "trained, 0 = off, negative values push toward the concept; the further from 1, "
                                       "the further from what the membrane was trained for."),
                io.Combo.Input("transport", options=TRANSPORT_MODES, default=TransportMode.PAPER.value,
                               tooltip=f"How the gate is computed per prompt. {TransportMode.described()}."),
                io.Combo.Input("rows", options=[r.value for r in Rows], default=Rows.POSITIVE_ONLY.value,
                               tooltip=f"Which CFG rows the membrane acts on. {Rows.described()}."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of sampling after which the membrane starts acting."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of sampling after which the membrane stops acting."),
                # added later: optional, so prompts saved before them run as they did then (no floor, negative
                # rows at strength, constant)
                io.Float.Input("min_gate", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="The least this membrane ever opens, whatever the prompt says (0 = the transport "
                                       "formula alone; 1 = always fully open). For concepts that must never pass: a "
                                       "paraphrase or an optimised prompt that fools the gate still meets this much "
                                       "of the membrane."),
                io.Float.Input("negative_strength", default=1.0, min=-MAX_STRENGTH, max=MAX_STRENGTH, step=0.05,
                               optional=True,
                               tooltip="Strength on the negative rows, when rows include them (official_code: strength "
                                       "everywhere)."),
                io.Combo.Input("ramp", options=[ramp.value for ramp in Ramp], default=Ramp.CONSTANT.value, optional=True,
                               tooltip=f"How the strength changes over start_percent..end_percent. {Ramp.described()}."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the membrane added.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, membrane) -> bool | str:
        """A membrane file that is not there is reported when the prompt is queued, before anything runs."""
        if isinstance(membrane, str):
            try:
                paths.membrane_path(membrane)
            except FileNotFoundError as error:
                return str(error)
        return True

    @classmethod
    def fingerprint_inputs(cls, membrane: str | None = None, **_inputs) -> str:
        """The membrane file's content hash: ComfyUI loads it again when the file under that name was
        replaced (whatever its size and modification time say), and not when it was only touched. A
        name that comes through a link is not known here (ComfyUI passes constants only)."""
        try:
            return paths.content_key(membrane) if isinstance(membrane, str) else ""
        except FileNotFoundError:
            return ""  # execute says the file is gone

    @classmethod
    def execute(cls, model, membrane, strength, transport, rows, start_percent, end_percent, min_gate=0.0,
                negative_strength=None, ramp=Ramp.CONSTANT.value, clip=None) -> io.NodeOutput:
        loaded = load_membrane(paths.membrane_path(membrane))
        mode = TransportMode.named(transport)
        if clip is None and mode is not TransportMode.ALWAYS_OPEN:
            raise SPMError(f"{membrane}: transport {mode.value!r} compares prompts with the membrane's concepts and "
                           "needs the clip input: connect the text encoder your prompts use, or choose always_open")
        try:  # errors about the membrane's concepts name its file
            transport_rate = transport_for(clip, loaded, mode, float(min_gate))
        except SPMError as error:
            raise SPMError(f"{membrane}: {error}") from None
        entry = MembraneEntry(membrane=loaded, strength=float(strength), transport=transport_rate,
                              rows=Rows.named(rows), start_percent=start_percent, end_percent=end_percent, node_id=cls.hidden.unique_id,
                              negative_strength=None if negative_strength is None else float(negative_strength),
                              ramp=Ramp.named(ramp))
        patched = with_membrane(model, entry)
        return io.NodeOutput(patched, ui={"spm_membrane": [{
            "name": loaded.name, "concepts": loaded.concept_labels, "architecture": loaded.architecture,
            "rank": loaded.rank, "layers": len(loaded.layers), "transport": mode.value,
            "note": "" if mode is not TransportMode.PAPER else
            "token overlap is used for prompts from SPM Text Encode; other prompts are gated by cosine only"}]})


class SPMTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SPMTextEncode",
            display_name="SPM Text Encode",
            category="conditioning/spm",
            description="CLIP Text Encode that also records the prompt's token ids, so membranes can use the paper's "
                        "token-overlap gate (plain CONDITIONING keeps no text).",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip="The prompt."),
            ],
            outputs=[io.Conditioning.Output(tooltip="Conditioning with the prompt's token ids attached.")],
        )

    @classmethod
    def execute(cls, clip, text) -> io.NodeOutput:
        if clip is None:
            raise RuntimeError("ERROR: clip input is invalid: None. If the clip is from a checkpoint loader node "
                               "your checkpoint does not contain a valid clip or text encoder model.")
        return io.NodeOutput(encode_with_tokens(clip, text))
