"""The miniature world in-process, on a real ComfyUI host: the shipped model, the pack imported by
ComfyUI's own loader, stock nodes to sample (EmptyLatentImage, KSampler), the pack's nodes and
training code to erase, and the classifier to read the pictures. Used by the erasure benchmark,
the quality test and the demo."""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .host import use_host
from .pack_loader import pack_module

SAMPLER = {"steps": 20, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal"}
PICTURE_SIDE = 128  # EmptyLatentImage size: a 16 x 16 latent


@dataclass(frozen=True)
class MembraneSettings:
    """SPM Train Membrane settings for the miniature world (its latent is 16 x 16). The paper's anchor
    strength (1000, for SD1.4) stopped all erasure here: this world's erase loss is ~0.003 per
    iteration, so 1000x the anchor loss drowned it (snowman: 0% erased at lr 1e-3 to 3e-2). The
    strength was chosen on "house" (10 and 1 both erased 100% of 16 generations with the others
    intact), never on the concepts the tests and the demo erase."""

    iterations: int = 200
    learning_rate: float = 1e-2
    anchor_strength: float = 10.0
    anchor_samples: int = 2
    surrogates: str = "prompts"
    rollout_steps: int = 20
    erase_guidance: float = 1.0
    seed: int = 0
    rank: int = 1
    adversaries: int = 0
    adversary_space: str = "tokens"
    adversary_every: int = 20
    adversary_steps: int = 20
    adversary_tokens: int = 3
    contexts: int = 2  # SPM Train Membrane's default (spm_core.training.TrainingConfig)
    rollout_cfg: float | None = None  # None: as the model is sampled (SPM Train Membrane's default)
    single_blocks: bool | None = None  # None: SPM Train Membrane's default (off)


WORLDS = {"unet": "miniworld.model", "dit": "miniworld.dit"}  # the shipped UNet, the miniature Flux


class Lab:
    def __init__(self, comfy_root: str | None = None, membrane_dir: str | None = None,
                 model_file: str | None = None, classifier_file: str | None = None,
                 embedding_dir: str | None = None, world: str = "unet") -> None:
        """`embedding_dir`: ComfyUI's embeddings folder for this process (default: a fresh temporary
        one), where the CLIP finds `embedding:name` as the example loader node's CLIP does.
        `world`: a key of WORLDS, the model that draws the miniature world."""
        use_host(comfy_root)
        import comfy.utils
        import folder_paths

        from miniworld.classifier import load_classifier
        from miniworld.model import CLASSIFIER_FILE

        self.world = world
        world_module = importlib.import_module(WORLDS[world])

        from .pack_loader import load_pack

        comfy.utils.PROGRESS_BAR_ENABLED = False
        self.package = load_pack().__name__
        self.embedding_dir = embedding_dir or tempfile.mkdtemp(prefix="miniworld-embeddings-")
        os.makedirs(self.embedding_dir, exist_ok=True)
        folder_paths.add_model_folder_path("embeddings", self.embedding_dir, is_default=True)
        self.model, self.clip, self.vae = world_module.load_world(model_file or world_module.MODEL_FILE,
                                                                  folder_paths.get_folder_paths("embeddings"))
        self.classifier = load_classifier(classifier_file or CLASSIFIER_FILE)
        self.membrane_dir = membrane_dir or tempfile.mkdtemp(prefix="miniworld-spm-")
        os.makedirs(self.membrane_dir, exist_ok=True)
        folder_paths.add_model_folder_path("spm", self.membrane_dir, is_default=True)
        self._conditioning: dict[str, object] = {}

    def pack(self, name: str):
        """A module of the loaded pack, e.g. pack("nodes.runtime")."""
        return pack_module(name)

    @staticmethod
    def node(name: str, unique_id: str = "lab"):
        from comfy_api.latest import io

        import nodes

        return nodes.NODE_CLASS_MAPPINGS[name].PREPARE_CLASS_CLONE({io.Hidden.unique_id: unique_id})

    def encode(self, text: str):
        """SPM Text Encode (the prompt's token ids ride along for the paper's token-overlap gate)."""
        if text not in self._conditioning:
            self._conditioning[text] = self.node("SPMTextEncode").execute(self.clip, text).result[0]
        return self._conditioning[text]

    @torch.no_grad()
    def generate(self, model, prompt: str | list, count: int = 32, seed: int = 0, negative: str = "") -> torch.Tensor:
        """`count` pictures (count, 3, 16, 16) for `prompt` (text, or a CONDITIONING), with the stock
        EmptyLatentImage and KSampler (one seed per batch: the same seed gives the same starting
        noise for every model)."""
        import nodes

        (latent,) = nodes.EmptyLatentImage().generate(PICTURE_SIDE, PICTURE_SIDE, count)
        (out,) = nodes.KSampler().sample(model, seed, SAMPLER["steps"], SAMPLER["cfg"], SAMPLER["sampler_name"],
                                         SAMPLER["scheduler"], self.encode(prompt) if isinstance(prompt, str) else prompt,
                                         self.encode(negative), latent)
        return self.vae.pictures(out["samples"])

    def read(self, pictures: torch.Tensor):
        from miniworld.classifier import classify

        return classify(self.classifier, pictures)

    def training_config(self, settings: MembraneSettings = MembraneSettings(), **overrides):
        """The pack's TrainingConfig for the lab's `settings` (and any other TrainingConfig field in `overrides`)."""
        return self.pack("spm_core.training").TrainingConfig(**{
            "iterations": settings.iterations, "learning_rate": settings.learning_rate,
            "anchor_strength": settings.anchor_strength, "anchor_samples": settings.anchor_samples,
            "surrogates": settings.surrogates, "rollout_steps": settings.rollout_steps,
            "erase_guidance": settings.erase_guidance, "latent_sizes": [PICTURE_SIDE // 8], "seed": settings.seed,
            "rank": settings.rank, "adversaries": settings.adversaries, "adversary_space": settings.adversary_space,
            "adversary_every": settings.adversary_every, "adversary_steps": settings.adversary_steps,
            "adversary_tokens": settings.adversary_tokens, "contexts": settings.contexts,
            "rollout_cfg": settings.rollout_cfg,
            **({} if settings.single_blocks is None else {"single_blocks": settings.single_blocks}), **overrides})

    def train_membrane(self, name: str, targets: Sequence[str], settings: MembraneSettings = MembraneSettings()) -> str:
        """Trains a membrane with the pack's own SPM Train Membrane code; returns its file name in the spm folder."""
        training = self.pack("nodes.training")
        config = self.training_config(settings)
        path = os.path.join(self.membrane_dir, f"{name}.safetensors")
        request = training.TrainingRequest(list(targets), [], "", config, path, False)
        with torch.inference_mode(False):
            training.train(self.model, self.clip, request, lambda report: None)
        return os.path.basename(path)

    def apply(self, model, membrane: str, transport: str = "paper", strength: float = 1.0, rows: str = "positive only"):
        """SPM Load Membrane on `model` (which is not changed)."""
        return self.node("SPMLoader").execute(model=model, clip=self.clip, membrane=membrane, strength=strength,
                                              transport=transport, rows=rows, start_percent=0.0, end_percent=1.0).result[0]
