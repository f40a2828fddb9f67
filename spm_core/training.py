"""Training a membrane with Latent Anchoring (docs/architecture.md, The method), against a small model protocol.

Per iteration, for one of the membrane's concepts:
  1. roll out k of T deterministic (DDIM/Euler) steps from where ComfyUI's samplers start, with
     CFG on the target and the membrane ON for the target row only (as SPM Load Membrane samples: the
     uncond row stays closed), giving x at noise level sigma_k; evaluate at that same sigma_k
     (the official loop evaluates about one step off);
  2. membrane OFF, one batched call: e_pos, e_neu and every anchor's prediction (the empty prompt,
     every batch's uncond row, is always one of the anchors);
  3. membrane ON, one batched call with gradients: e_tar and every anchor's prediction;
  4. loss = ||e_tar - (e_neu - g (e_pos - e_neu))||² + lambda · mean ||anchor_on - anchor_off||².
With `contexts` > 0 (spm_core.contexts), call 2 also predicts each drawn context's two prompts, call 3
its prompt with the concept, and the erase term is one mean over the concept's row and the contexts'
rows, each against the erase target built from its own pair.
With `adversaries` > 0, every `adversary_every` iterations a prompt is searched by gradient descent
that makes the model draw the concept *with the membrane on*; the last `adversaries` such aliases
are erased beside the target, so the membrane learns to close the holes an optimised prompt would
find (adversarial training in the spirit of AdvUnlearn and Receler). In `tokens` space the search
optimises free token embeddings inside a prompt and encodes them with the real text encoder (what
a textual-inversion file or an optimised prompt gives an attacker); in `conditioning` space it
shifts a surrogate's encoder output directly, which needs nothing from the text encoder but finds
conditionings no prompt can produce.
An iteration whose gradients are not finite (an fp16/bf16 model overflowing) changes nothing and
is reported as skipped; non-finite weights are never saved. No UNet row is evaluated and thrown
away (the official loop computes unconditional halves it discards). The model adapter turns its
output into a noise prediction, so v-prediction models train correctly. Randomness comes from
(seed, iteration), so a resumed run continues the same sequence of draws.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol

import torch

from .choice import Choice
from .concepts import Concept
from .contexts import ContextPrompts
from .erasure import erasure_level, make_probes
from .errors import SPMError
from .file_format import is_text_token_layer
from .membrane import LayerWeights, Membrane
from .stack import module_shape, text_tokens_handed_on
from .surrogates import Prompt


class AdversarySpace(Choice):
    """Where the adversarial training searches for prompts that bring the concept back."""

    TOKENS = "tokens"              # free token embeddings, through the real text encoder
    CONDITIONING = "conditioning"  # the encoder's output, shifted directly


@dataclass
class TrainingConfig:
    iterations: int = field(default=3000, metadata={"help": (
        "Training iterations. The paper uses 3000; a few hundred already erase on SD1.5.")})
    learning_rate: float = field(default=1e-4, metadata={"help": (
        "AdamW learning rate (cosine schedule with restarts).")})
    rank: int = field(default=1, metadata={"help": "Rank of the membrane (1 in the paper)."})
    alpha: float = field(default=1.0, metadata={"help": "Scale numerator: the branch is multiplied by alpha / rank."})
    erase_guidance: float = field(default=1.0, metadata={"help": (
        "How far past the neutral prediction the target is pushed (ESD guidance).")})
    anchor_strength: float = field(default=1000.0, metadata={"help": (
        "Weight of Latent Anchoring (lambda, 1000 in the paper). 0 switches it off.")})
    anchor_samples: int = field(default=2, metadata={"help": "Surrogate prompts anchored per iteration."})
    rollout_steps: int = field(default=30, metadata={"help": (
        "DDIM steps T of the rollout that makes the training latents (30 in the paper); each iteration rolls "
        "out a random 1..T-1 of them.")})
    rollout_cfg: float | None = field(default=None, metadata={"help": (
        "CFG of the rollouts that make the training latents. Not set (0 on the node): as the model is sampled, 1 on "
        "Flux.1 (guidance-distilled) and 3 elsewhere (the paper's). Set it for a Flux derivative you sample with CFG.")})
    latent_sizes: list[int] = field(default_factory=lambda: [64], metadata={"help": (
        "Latent side used in training: 64 = 512 px (SD1.5, Flux), 96 = 768 px (SD2), 128 = 1024 px (SDXL).")})
    restarts: int = field(default=1, metadata={"help": "Cycles of the cosine learning-rate schedule."})
    grad_clip: float = field(default=1.0, metadata={"help": "Largest gradient norm per iteration."})
    seed: int = field(default=0, metadata={"help": "Seed: the same seed gives the same membrane."})
    surrogates: str = field(default="prompts", metadata={"help": (
        "Where anchors come from. prompts: random real word prompts (ours); gaussian: random directions in "
        "embedding space (the official sampler).")})
    adversaries: int = field(default=0, metadata={"help": (
        "Robustness against optimised prompts and textual-inversion embeddings: how many adversarial prompts the "
        "membrane erases beside the target. Every adversary_every iterations a prompt that brings the concept back "
        "through the membrane is searched and joins this bank (the oldest leaves). 0 = off.")})
    adversary_every: int = field(default=20, metadata={"help": "Iterations between two adversarial prompt searches."})
    adversary_steps: int = field(default=20, metadata={"help": (
        "Gradient steps of one adversarial prompt search (each costs about one model call with gradients).")})
    adversary_learning_rate: float = field(default=0.1, metadata={"help": (
        "Step size of the search, relative to the typical size of a token embedding.")})
    adversary_space: str = field(default=AdversarySpace.TOKENS.value, metadata={"help": (
        "Where the search runs. tokens: free token embeddings in a prompt, through the text encoder (what an "
        "attacker with an embedding file has); conditioning: the encoder's output shifted directly.")})
    adversary_tokens: int = field(default=3, metadata={"help": "Free tokens in each adversarial prompt (1..16)."})
    contexts: int = field(default=2, metadata={"help": (
        "Erase the concept inside other prompts too: per iteration, this many prompts of random vocabulary words "
        "with the concept among them are erased beside the concept's own prompt (each against the same words "
        "without it), so the membrane learns the concept rather than one sentence. 0 = off.")})
    stop_at_erasure: float = field(default=0.0, metadata={"help": (
        "Stop when the erasure level of every concept reaches this; the iterations are then the cap. 0 = train all "
        "iterations. The level needs no classifier: 0 = the concept is predicted as by the bare model, 1 = as the "
        "neutral (or surrogate) prompt; training aims at 1 + erase guidance.")})
    erasure_every: int = field(default=25, metadata={"help": (
        "Iterations between two measurements of the erasure level (it is also measured after the last one).")})
    gradient_checkpointing: bool = field(default=False, metadata={"help": (
        "Keep only each transformer block's inputs for the backward pass and run the block again there: the "
        "activations of one block at a time instead of all of them (what a Flux needs on a 24 GB GPU), for one "
        "more forward pass of the rows with gradients per iteration. The membrane trained is the same.")})
    single_blocks: bool = field(default=False, metadata={"help": (
        "Flux-class models: adapt the single blocks too, on the text tokens only (no image token passes through "
        "the membrane there), beside txt_in and the double blocks' text stream. On the miniature DiT it erased "
        "about as much (within the measure's interval; more of the characters, less of the colours). Such a file "
        "cannot be baked into a plain LoRA, and a stock LoRA loader applies those layers to the image tokens as "
        "well. No effect on UNets.")})

    @classmethod
    def help(cls, name: str) -> str:
        """The user-facing description of a setting, written once here for tooltips, help and the command line."""
        return cls.__dataclass_fields__[name].metadata["help"]

    def check(self) -> TrainingConfig:
        problems = []
        if self.iterations < 1:
            problems.append("iterations must be at least 1")
        if not (0 < self.learning_rate < 1) or not math.isfinite(self.learning_rate):
            problems.append(f"learning rate {self.learning_rate} is outside (0, 1)")
        if self.rank < 1:
            problems.append("rank must be at least 1")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            problems.append("alpha must be a positive number")
        if self.anchor_samples < 0 or self.anchor_strength < 0:
            problems.append("anchor samples and anchor strength cannot be negative")
        if self.rollout_steps < 2:
            problems.append("rollout steps must be at least 2")
        if self.rollout_cfg is not None and not (1 <= self.rollout_cfg <= 30):
            problems.append(f"rollout CFG {self.rollout_cfg} is outside 1..30")
        for name in ("gradient_checkpointing", "single_blocks"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name.replace('_', ' ')} must be true or false, not {getattr(self, name)!r}")
        if not 0 <= self.contexts <= 16:
            problems.append(f"contexts {self.contexts} is outside 0..16")
        if self.adversaries < 0 or self.adversary_every < 1 or self.adversary_steps < 1:
            problems.append("adversaries cannot be negative; adversary interval and steps must be at least 1")
        if not (0 <= self.stop_at_erasure <= 10) or not math.isfinite(self.stop_at_erasure):
            problems.append(f"stop at erasure {self.stop_at_erasure} is outside 0..10")
        if self.erasure_every < 1:
            problems.append("erasure interval must be at least 1")
        if not 1 <= self.adversary_tokens <= 16:
            problems.append(f"adversary tokens {self.adversary_tokens} is outside 1..16")
        if not (0 < self.adversary_learning_rate <= 10) or not math.isfinite(self.adversary_learning_rate):
            problems.append(f"adversary learning rate {self.adversary_learning_rate} is outside (0, 10]")
        if self.adversary_space not in {space.value for space in AdversarySpace}:
            problems.append(f"adversary space {self.adversary_space!r} is not one of "
                            f"{', '.join(repr(space.value) for space in AdversarySpace)}")
        if not self.latent_sizes or any(s < 8 or s % 8 for s in self.latent_sizes):
            problems.append("latent sizes must be multiples of 8")
        if problems:
            raise SPMError("training settings: " + "; ".join(problems))
        return self

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ConceptPrompts:
    """The encoded prompts of one concept: target, positive (default = target), neutral
    (default = "" ; for an edit, the surrogate)."""

    concept: Concept
    target: Prompt
    positive: Prompt
    neutral: Prompt


class NoisePredictor(Protocol):
    """What training needs from a diffusion model."""

    latent_channels: int

    def sigmas(self, steps: int) -> torch.Tensor:
        """steps + 1 decreasing noise levels, the last one 0."""

    def start(self, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The latent a sampler starts from at noise level sigma, given unit Gaussian noise."""

    def eps(self, x: torch.Tensor, sigma: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        """Noise prediction (velocity on flow models: what an Euler step follows) for each row of x at
        noise level sigma, row i conditioned on prompts[i]."""


class SoftPrompts(Protocol):
    """Prompts with free token embeddings, encoded by the model's own text encoder with gradients:
    what an attacker controls with a textual-inversion file or an optimised prompt."""

    token_scale: float  # the typical size of one token embedding: step sizes are relative to it

    def initial(self, concept_index: int, count: int, generator: torch.Generator) -> list[torch.Tensor]:
        """`count` starting token embeddings (one tensor per text encoder), e.g. from the concept's own words."""

    def encode(self, tokens: Sequence[torch.Tensor]) -> Prompt:
        """The encoded prompt with `tokens` in it, differentiable with respect to `tokens`."""


MAX_SKIPPED_STEPS = 20
PAPER_ROLLOUT_CFG = 3.0  # the rollouts' CFG when the settings leave it to the model and nothing says otherwise
ERASURE_PROBE_SEEDS = (0, 1)


def erasure_probe_steps(rollout_steps: int) -> tuple[int, ...]:
    """Where on the bare trajectory the erasure level is taken: early, middle and late steps (for 20
    rollout steps: 2, 5, 10), where the concept's layout and then its details are drawn."""
    return tuple(sorted({max(1, rollout_steps // 10), max(1, rollout_steps // 4), rollout_steps // 2}))


class TrainableMembrane(torch.nn.Module):
    """A membrane whose downs and ups are fp32 parameters, attached to model layers with forward
    hooks that add its branch while `enabled` is set."""

    def __init__(self, layer_shapes: Mapping[str, tuple[int, int, bool]], rank: int, alpha: float, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.names = sorted(layer_shapes)
        self.alpha, self.conv = alpha, {name: layer_shapes[name][2] for name in self.names}
        self.down = torch.nn.ParameterList()
        self.up = torch.nn.ParameterList()
        for name in self.names:
            out_features, in_features, _ = layer_shapes[name]
            bound = 1.0 / math.sqrt(in_features)  # kaiming-uniform with a = sqrt(5), as nn.Linear
            self.down.append(torch.nn.Parameter((torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound))
            self.up.append(torch.nn.Parameter(torch.zeros(out_features, rank)))
        self.enabled = False
        self.row_mask: torch.Tensor | None = None  # (rows,) 0/1: which batch rows the branch acts on
        # Flux single-block layers act on the text tokens only: how many lead their input, from the text stream
        self.text_token_layers = {index for index, name in enumerate(self.names) if is_text_token_layer(name)}
        self.text_tokens: int | None = None
        self._handles: list = []

    @classmethod
    def for_modules(cls, modules: Mapping[str, torch.nn.Module], rank: int, alpha: float, seed: int) -> TrainableMembrane:
        """A membrane for `modules` (file layer name -> the Linear or 1x1 conv it adapts)."""
        return cls({name: module_shape(module) for name, module in modules.items()}, rank, alpha, seed)

    def layer(self, index: int) -> LayerWeights:
        return LayerWeights(down=self.down[index], up=self.up[index], alpha=self.alpha, conv=self.conv[self.names[index]])

    def load_weights(self, membrane: Membrane) -> None:
        with torch.no_grad():
            for index, name in enumerate(self.names):
                if name not in membrane.layers:
                    raise SPMError(f"cannot resume: the saved membrane has no layer {name}")
                saved = membrane.layers[name]
                if saved.down.shape != self.down[index].shape or saved.up.shape != self.up[index].shape:
                    raise SPMError(f"cannot resume: layer {name} has another shape (rank {saved.rank}?)")
                self.down[index].copy_(saved.down)
                self.up[index].copy_(saved.up)

    def attach(self, modules: Mapping[str, torch.nn.Module], text_streams: Sequence[torch.nn.Module] = ()) -> None:
        """Hooks on `modules` (by layer name) and, for layers on text tokens only, on `text_streams`
        (blocks that return (image tokens, text tokens)), as the inference hooks (stack.InstalledHooks)."""
        self.detach()
        if self.text_token_layers and not text_streams:
            raise SPMError("this membrane adapts layers on text tokens only, and the model has no text stream to count them from")
        for index, name in enumerate(self.names):
            self._handles.append(modules[name].register_forward_hook(self._hook(index)))
        if self.text_token_layers:
            self._handles += [block.register_forward_hook(self._note_text_stream) for block in text_streams]

    def _note_text_stream(self, module: torch.nn.Module, inputs: tuple, output: tuple) -> None:
        self.text_tokens = text_tokens_handed_on(output)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, index: int):
        def hook(module, inputs, output):
            if not self.enabled:
                return None
            x = inputs[0]
            text_tokens = self.text_tokens if index in self.text_token_layers else None
            if index in self.text_token_layers:
                if text_tokens is None or not 0 < text_tokens < x.shape[1]:
                    raise SPMError(f"layer {self.names[index]} acts on text tokens only and met {x.shape[1]} tokens, "
                                   f"but the model's text stream gave {text_tokens}")
                x = x[:, :text_tokens]
            # the branch runs in fp32 whatever the base precision
            branch = self.layer(index).branch(x.float())
            if self.row_mask is not None:
                branch = branch * self.row_mask.to(branch).reshape(-1, *([1] * (branch.ndim - 1)))
            if text_tokens is not None:
                return torch.cat([output[:, :text_tokens] + branch.to(output.dtype), output[:, text_tokens:]], dim=1)
            return output + branch.to(output.dtype)
        return hook

    def as_now(self) -> Callable[[], AbstractContextManager]:
        """What switches the branch as it is switched now, to enter later: gradient checkpointing
        recomputes a block inside backward, when the trainer has already switched the branch off."""
        now = self.enabled, self.row_mask, self.text_tokens

        @contextmanager
        def switched():
            before = self.enabled, self.row_mask, self.text_tokens
            self.enabled, self.row_mask, self.text_tokens = now
            try:
                yield
            finally:
                self.enabled, self.row_mask, self.text_tokens = before
        return switched

    def as_membrane(self, name: str, concepts: tuple[Concept, ...], architecture: str, metadata: dict | None = None) -> Membrane:
        if not all(torch.isfinite(p).all() for p in self.parameters()):
            raise SPMError(f"membrane {name!r} has non-finite weights; it is not saved")
        layers = {n: LayerWeights(self.down[i].detach().clone(), self.up[i].detach().clone(), self.alpha, self.conv[n])
                  for i, n in enumerate(self.names)}
        return Membrane(name=name, concepts=concepts, layers=layers, architecture=architecture, metadata=metadata or {})


@dataclass
class StepReport:
    iteration: int
    loss: float
    erase_loss: float
    anchor_loss: float
    learning_rate: float
    skipped: bool = False  # gradients were not finite: no update this iteration
    erasure: float | None = None  # the erasure level, on the iterations it was measured


class Trainer:
    """Runs the loop. `callback(report)` is called after every iteration (progress, cancel)."""

    def __init__(self, model: NoisePredictor, membrane: TrainableMembrane, concepts: Sequence[ConceptPrompts],
                 empty: Prompt, surrogates, config: TrainingConfig, soft_prompts: SoftPrompts | None = None,
                 contexts: ContextPrompts | None = None) -> None:
        if not concepts:
            raise SPMError("nothing to train: give at least one target concept")
        config.check()
        if config.rollout_cfg is None:
            config = replace(config, rollout_cfg=PAPER_ROLLOUT_CFG)
        if config.adversaries and config.adversary_space == AdversarySpace.TOKENS.value and soft_prompts is None:
            raise SPMError("adversarial training in token space needs the text encoder; this model gives none "
                           "(use adversary space 'conditioning')")
        if config.contexts and contexts is None:
            raise SPMError("training with contexts needs context prompts (the text encoder); this model gives none")
        self.model, self.membrane, self.concepts, self.empty = model, membrane, list(concepts), empty
        self.surrogates, self.config, self.soft_prompts, self.contexts = surrogates, config, soft_prompts, contexts
        self.optimizer = torch.optim.AdamW(membrane.parameters(), lr=config.learning_rate)
        cycle = max(1, math.ceil(config.iterations / max(1, config.restarts)))
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(self.optimizer, T_0=cycle)
        self.history: list[StepReport] = []
        self.unet_rows = 0  # noise predictions computed, counted per batch row
        self.skipped_steps = 0
        self.aliases: list[tuple[int, Prompt]] = []  # (concept index, adversarial conditioning)
        self.adversary_seconds = 0.0  # time spent searching aliases, to report what robustness costs
        self.searches: list[tuple[float, float]] = []  # each search's loss at its first and last step
        self.stopped_at: int | None = None  # the iteration count at which the erasure level was reached
        self._probes: list | None = None

    def state(self) -> dict[str, torch.Tensor]:
        """What a stopped run needs, beside the membrane's weights, to continue exactly as if it had not
        stopped: the optimiser's moments, the adversarial bank and the count of skipped iterations."""
        tensors = {f"optimizer.{index}.{key}": torch.as_tensor(value).detach().clone()
                   for index, moments in self.optimizer.state_dict()["state"].items() for key, value in moments.items()}
        for number, (concept_index, alias) in enumerate(self.aliases):
            tensors[f"alias.{number}.concept"] = torch.tensor(concept_index)
            tensors[f"alias.{number}.embedding"] = alias.embedding.detach().clone()
            if alias.pooled is not None:
                tensors[f"alias.{number}.pooled"] = alias.pooled.detach().clone()
        tensors["skipped_steps"] = torch.tensor(self.skipped_steps)
        return tensors

    def restore(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        """Continue from `state()`, saved by a run of the same membrane and settings (`source` names
        it in errors). Nothing changes when it does not fit."""
        parameters = list(self.membrane.parameters())
        moments: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                moments.setdefault(int(index), {})[name] = value
        for index, entry in moments.items():
            shapes_fit = index < len(parameters) and all(
                entry[name].shape == parameters[index].shape for name in ("exp_avg", "exp_avg_sq") if name in entry)
            if not shapes_fit:
                raise SPMError(f"{source}: its optimiser state does not fit this membrane (another rank or model?); "
                               "delete it to resume with fresh optimiser moments")
        aliases = []
        while f"alias.{len(aliases)}.embedding" in tensors:
            number = len(aliases)
            pooled = tensors.get(f"alias.{number}.pooled")
            aliases.append((int(tensors[f"alias.{number}.concept"]), Prompt(tensors[f"alias.{number}.embedding"], pooled)))
        if any(concept_index >= len(self.concepts) for concept_index, _ in aliases):
            raise SPMError(f"{source}: its adversarial prompts belong to other concepts than this training's")
        optimizer_state = self.optimizer.state_dict()
        optimizer_state["state"] = moments
        self.optimizer.load_state_dict(optimizer_state)
        self.aliases = aliases
        self.skipped_steps = int(tensors.get("skipped_steps", torch.tensor(0)))

    def run(self, start: int = 0, callback: Callable[[StepReport], None] | None = None) -> list[StepReport]:
        for _ in range(start):
            self.scheduler.step()  # a resumed run continues the same learning-rate schedule
        config = self.config
        for iteration in range(start, config.iterations):
            report = self.step(iteration)
            if (iteration + 1) % config.erasure_every == 0 or iteration + 1 == config.iterations:
                report.erasure = self.erasure_level()
            self.history.append(report)
            if callback is not None:
                callback(report)
            if config.stop_at_erasure and report.erasure is not None and report.erasure >= config.stop_at_erasure:
                self.stopped_at = iteration + 1
                break
        return self.history

    def erasure_level(self) -> float:
        """The least erasure level over the membrane's concepts (spm_core.erasure), at probes fixed
        on the first call: the bare model's own trajectories for each target."""
        counted = _CountedRows(self)
        if self._probes is None:
            self.membrane.enabled = False
            steps = erasure_probe_steps(self.config.rollout_steps)
            self._probes = [make_probes(counted, c.target, self.empty, self.config.latent_sizes[0], ERASURE_PROBE_SEEDS,
                                        self.config.rollout_steps, self.config.rollout_cfg, steps) for c in self.concepts]

        def set_membrane(on: bool) -> None:
            self.membrane.enabled = on
        return min(erasure_level(counted, set_membrane, concept, probes)
                   for concept, probes in zip(self.concepts, self._probes))

    def step(self, iteration: int) -> StepReport:
        config = self.config
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + iteration)
        concept_index = int(torch.randint(len(self.concepts), (), generator=generator))
        concept = self.concepts[concept_index]
        size = config.latent_sizes[int(torch.randint(len(config.latent_sizes), (), generator=generator))]
        k = int(torch.randint(1, config.rollout_steps, (), generator=generator))
        x, sigma = self._rollout(concept.target, size, k, generator)
        # the empty prompt is always anchored: it is every CFG batch's uncond row
        anchors = [self.empty, *self.surrogates.sample(config.anchor_samples, generator)] if config.anchor_strength > 0 else []

        pairs = self.contexts.sample(concept_index, config.contexts, generator) if config.contexts else []

        with torch.no_grad():
            self.membrane.enabled = False
            off = self._eps(x, sigma, [concept.positive, concept.neutral, *(p.named for p in pairs),
                                       *(p.neutral for p in pairs), *anchors])
        e_pos, e_neu = off[:1], off[1:2]
        named_off, neutral_off = off[2:2 + len(pairs)], off[2 + len(pairs):2 + 2 * len(pairs)]
        anchors_off = off[2 + 2 * len(pairs):]
        target = e_neu - config.erase_guidance * (e_pos - e_neu)
        if config.adversaries and iteration % config.adversary_every == 0:
            started = time.perf_counter()
            self._add_alias(concept_index, x, sigma, e_pos, generator)
            self.adversary_seconds += time.perf_counter() - started
        erased = [concept.target, *(alias for index, alias in self.aliases if index == concept_index)]

        self.membrane.enabled = True
        try:
            on = self._eps(x, sigma, [*erased, *(p.named for p in pairs), *anchors])
        finally:
            self.membrane.enabled = False
        count = len(erased) + len(pairs)
        # one mean over every erased row: weighting the concept's own prompt fully on top of its contexts
        # pushed harder and left more noise (cross: 87.5% erased into clean pictures, 12.5% noise,
        # against 99% and 1%)
        targets = torch.cat([target.expand(len(erased), -1, -1, -1),
                             neutral_off - config.erase_guidance * (named_off - neutral_off)])
        erase_loss = torch.nn.functional.mse_loss(on[:count].float(), targets.float())
        anchor_loss = torch.nn.functional.mse_loss(on[count:].float(), anchors_off.float()) if anchors else torch.zeros(())
        loss = erase_loss + config.anchor_strength * anchor_loss
        if not torch.isfinite(loss):
            raise SPMError(f"training diverged at iteration {iteration} (loss {loss.item()}); lower the learning rate")

        parameters = list(self.membrane.parameters())
        gradients = torch.autograd.grad(loss, parameters)  # only the membrane: base weights stay untouched
        skipped = not all(torch.isfinite(g).all() for g in gradients)
        if skipped:  # an fp16/bf16 model overflowed in backward: never let inf/NaN reach the weights
            self.skipped_steps += 1
            if self.skipped_steps > MAX_SKIPPED_STEPS:
                raise SPMError(f"gradients were not finite in {self.skipped_steps} iterations (last: {iteration}); the "
                               "model's precision overflows: load it in fp32 or lower the learning rate")
        else:
            for parameter, gradient in zip(parameters, gradients):
                parameter.grad = gradient
            torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        learning_rate = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return StepReport(iteration, loss.item(), erase_loss.item(), anchor_loss.item(), learning_rate, skipped)

    def _add_alias(self, concept_index: int, x: torch.Tensor, sigma: torch.Tensor, e_pos: torch.Tensor,
                   generator: torch.Generator) -> None:
        """Search a prompt that, through the membrane, predicts what the bare model predicts for the
        concept (e_pos): a prompt the membrane fails to erase. It joins the aliases erased from now on."""
        config = self.config
        if config.adversary_space == AdversarySpace.TOKENS.value:
            variables = [t.detach().float().clone().requires_grad_(True)
                         for t in self.soft_prompts.initial(concept_index, config.adversary_tokens, generator)]
            scale = self.soft_prompts.token_scale

            def prompt() -> Prompt:
                return self.soft_prompts.encode(variables)
        else:  # shift a surrogate's conditioning
            start = self.surrogates.sample(1, generator)[0]
            scale = float(start.embedding.float().std())
            variables = [torch.zeros_like(start.embedding, dtype=torch.float32, requires_grad=True)]

            def prompt() -> Prompt:
                return Prompt(start.embedding.float() + variables[0], start.pooled)
        optimizer = torch.optim.Adam(variables, lr=config.adversary_learning_rate * scale)
        losses = []
        self.membrane.enabled = True
        try:
            with torch.enable_grad():
                for _ in range(config.adversary_steps):
                    loss = torch.nn.functional.mse_loss(self._eps(x, sigma, [prompt()]).float(), e_pos.float())
                    gradients = torch.autograd.grad(loss, variables)
                    for variable, gradient in zip(variables, gradients):
                        variable.grad = gradient
                    optimizer.step()
                    losses.append(loss.item())
            with torch.no_grad():
                found = prompt()
        finally:
            self.membrane.enabled = False
        self.searches.append((losses[0], losses[-1]))
        alias = Prompt(found.embedding.detach().clone(), None if found.pooled is None else found.pooled.detach().clone())
        self.aliases = [*self.aliases, (concept_index, alias)][-config.adversaries:]

    def _eps(self, x: torch.Tensor, sigma: torch.Tensor, prompts: list[Prompt]) -> torch.Tensor:
        rows = len(prompts)
        self.unet_rows += rows
        return self.model.eps(x.repeat(rows, 1, 1, 1), sigma.repeat(rows), prompts)

    @torch.no_grad()
    def _rollout(self, target: Prompt, size: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """k deterministic steps from pure noise with CFG on the target, the membrane ON for the target
        row and OFF for the uncond row, as SPM Load Membrane samples by default; returns (x, sigma_k).
        At CFG 1 (models sampled without CFG, e.g. guidance-distilled Flux.1) no uncond row is
        evaluated, as ComfyUI's samplers skip it; an uncond row of another length than the target's
        (T5 without padding: Chroma) is predicted in a call of its own, as ComfyUI's samplers do."""
        sigmas = self.model.sigmas(self.config.rollout_steps).float()
        x = self.model.start(torch.randn(1, self.model.latent_channels, size, size, generator=generator), sigmas[0])
        cfg = self.config.rollout_cfg
        for i in range(k):
            sigma = sigmas[i:i + 1]
            if math.isclose(cfg, 1.0):
                eps = self._with_membrane(x, sigma, [target], torch.tensor([1.0]))
            elif target.embedding.shape != self.empty.embedding.shape:
                uncond = self._eps(x, sigma, [self.empty])  # the membrane is off outside _with_membrane
                eps = uncond + cfg * (self._with_membrane(x, sigma, [target], torch.tensor([1.0])) - uncond)
            else:
                both = self._with_membrane(x, sigma, [self.empty, target], torch.tensor([0.0, 1.0]))
                eps = both[:1] + cfg * (both[1:] - both[:1])
            x = x + (sigmas[i + 1] - sigmas[i]) * eps
        return x, sigmas[k:k + 1]

    def _with_membrane(self, x: torch.Tensor, sigma: torch.Tensor, prompts: list[Prompt], rows: torch.Tensor) -> torch.Tensor:
        """Predictions with the membrane on the rows where `rows` is 1 and off where it is 0."""
        self.membrane.enabled, self.membrane.row_mask = True, rows
        try:
            return self._eps(x, sigma, prompts)
        finally:
            self.membrane.enabled, self.membrane.row_mask = False, None


class _CountedRows:
    """The model as the erasure measure sees it: its rows count with the training's."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer, self.latent_channels = trainer, trainer.model.latent_channels
        self.sigmas, self.start = trainer.model.sigmas, trainer.model.start

    def eps(self, x: torch.Tensor, sigma: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        self.trainer.unet_rows += len(prompts)
        return self.trainer.model.eps(x, sigma, prompts)


def training_metadata(config: TrainingConfig, completed: int, extra: Mapping | None = None) -> dict:
    """What goes into the file's `training` metadata: the config, how far it got, and any extras."""
    return {**config.to_json(), "completed_iterations": completed, **(extra or {})}

