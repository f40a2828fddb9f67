"""How the benchmark puts membranes on the miniature model: each setup gives, for a prompt, the
model to sample and a key that says which setups draw the same pictures for it.

  Bare      a model (the shipped one unless given), nothing applied.
  StockLoraLoader  a membrane file through ComfyUI's own LoRA loading (what LoraLoader does with it).
  Chain     membranes through the pack's SPM Load Membrane nodes, one per membrane, with a transport mode:
            exactly what a ComfyUI user's graph does.
  Official  the official inference code's behaviour: the paper gate computed once per prompt and
            used for the whole CFG batch (the negative row too), every membrane's down and up
            scaled by it and summed into one adapter (spm_core.membrane.official_merge), i.e.
            gate² for one membrane and cross-terms for several. Applied through SPM Load Membrane as an
            always-open merged file built for that prompt's gates.
Keys: a text-gated chain whose gates for a prompt are all 0 draws what the bare model draws; two
setups with the same membranes and the same gates draw the same pictures. Latent gates are known
only while sampling, so those setups never share.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Hashable, Sequence

import torch

from .harness import Lab

BOTH_ROWS = "positive and negative"


class Bare:
    def __init__(self, lab: Lab, model=None, label: str = "bare model") -> None:
        self.lab, self.label = lab, label
        self.model = model if model is not None else lab.model

    def model_for(self, text: str):
        return self.model

    def key_for(self, text: str) -> Hashable:
        return "bare" if self.model is self.lab.model else ("bare", id(self.model))


class StockLoraLoader(Bare):
    def __init__(self, lab: Lab, label: str, membrane: str) -> None:
        import comfy.sd
        import comfy.utils

        lora = comfy.utils.load_torch_file(os.path.join(lab.membrane_dir, membrane), safe_load=True)
        super().__init__(lab, comfy.sd.load_lora_for_models(lab.model, None, lora, 1.0, 0.0)[0], label)


class Chain:
    def __init__(self, lab: Lab, label: str, membranes: Sequence[str], transport: str, model=None) -> None:
        self.lab, self.label, self.membranes, self.transport = lab, label, tuple(membranes), transport
        self.model = model if model is not None else lab.model
        self.base = self.model
        for membrane in membranes:
            self.model = lab.apply(self.model, membrane, transport)
        self.state = lab.pack("nodes.runtime").state_of(self.model)

    def gates(self, text: str) -> torch.Tensor:
        """The text gates (membranes,) SPM Load Membrane's runtime computes for this prompt's positive row."""
        encode = self.lab.pack("nodes.encode")
        embedding, options = self.lab.encode(text)[0]
        return self.state.gates_for(embedding[:1], options.get(encode.TOKENS_KEY))[0]

    def model_for(self, text: str):
        return self.model

    def key_for(self, text: str) -> Hashable | None:
        if self.state.reads_model:
            return None
        gates = self.gates(text)
        if not bool(gates.any()):
            return "bare" if self.base is self.lab.model else None
        return ("chain", id(self.base), self.membranes, tuple(round(float(g), 6) for g in gates))


class Official:
    def __init__(self, lab: Lab, label: str, membranes: Sequence[str]) -> None:
        file_format, membrane = lab.pack("spm_core.file_format"), lab.pack("spm_core.membrane")
        self.lab, self.label, self.membranes = lab, label, tuple(membranes)
        self.paper = Chain(lab, "paper gates", membranes, "paper")
        self.loaded = [file_format.load_membrane(os.path.join(lab.membrane_dir, m)) for m in membranes]
        self._save, self._merge = file_format.save_membrane, membrane.official_merge

    def _merged_file(self, gates: torch.Tensor) -> str:
        values = [round(float(g), 6) for g in gates]
        digest = hashlib.sha256(repr((self.membranes, values)).encode()).hexdigest()[:12]
        name = f"official-{digest}.safetensors"
        path = os.path.join(self.lab.membrane_dir, name)
        if not os.path.exists(path):
            self._save(path, self._merge(self.loaded, values))
        return name

    def model_for(self, text: str):
        return self.lab.apply(self.lab.model, self._merged_file(self.paper.gates(text)), "always_open", rows=BOTH_ROWS)

    def key_for(self, text: str) -> Hashable:
        gates = self.paper.gates(text)
        if not bool(gates.any()):
            return "bare"
        return ("official", self.membranes, tuple(round(float(g), 6) for g in gates))
