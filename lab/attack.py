"""A gradient attack on a membrane, in the spirit of UnlearnDiffAtk (Zhang et al., 2024).

The attacker writes a prompt with a few free token embeddings in it (what a textual-inversion file
gives a ComfyUI user) and optimises those embeddings so that the model *with the membrane and its
gate* reproduces pictures of the erased concept: the diffusion loss against the bare model's own
pictures of "a <concept>", at random noise levels. The gate is computed from the attacker's
conditioning exactly as SPM Load Membrane computes it (text gates from the embedding; the latent
gate from the bare model's look-ahead; the guarded gate's breach from a look-ahead with the
membrane open, and the prompt it then replaces), and differentiated through, so the attack adapts
to the gate. The result is then sampled through the real SPM Load Membrane runtime and read by the
classifier.

Where the free tokens sit (between the concept-free words `before` and `after`), how many there
are, how they start (random, or the concept's own word embedding), how long they are optimised and
how many independent restarts are tried (the one with the lowest final loss kept) are settings;
the defaults are the benchmark's original attack: "a" and three random tokens, 150 steps. The same
optimiser, run on the bare model, is textual inversion (lab/textual_inversion.py).

With `straight_through` the gates' ramps pass gradients through their clamps (BPDA): a gate or
breach saturated at 0 or 1 otherwise gives the attacker no direction to close it.

A `discrete` attack keeps every free token a word of the vocabulary, as UnlearnDiffAtk's (the
protocol behind the published attack-success figures): the forward pass uses each free vector's
nearest vocabulary embedding, the gradient updates the free vector (a straight-through estimate,
as in PEZ, Wen et al. 2023), and the result is the nearest words, i.e. a prompt anyone can type.

The free tokens live in the token table of the text encoder the model reads (lab/prompt_spaces.py):
CLIP's in the UNet world, T5's in the DiT world (whose membranes bind to T5's text stream).
"""

from __future__ import annotations

from dataclasses import dataclass
from unittest import mock

import torch

from miniworld.model import pictures_to_model_space

from .harness import PICTURE_SIDE
from .prompt_spaces import Frame, prompt_space

INITS = ("random", "concept")
EVALUATION_SIGMAS = 4  # noise levels per reference picture in the fixed batch that scores a run
CONCEPT_INIT_NOISE = 0.1  # so that restarts from the concept's word do not all start at one point
DISCRETE_CHECK_EVERY = 25  # steps between two scorings of a discrete attack's current words


@dataclass(frozen=True)
class AttackSettings:
    soft_tokens: int = 3
    steps: int = 150
    learning_rate: float = 0.1
    batch: int = 8
    reference_pictures: int = 32
    seed: int = 0
    before: str = "a"      # concept-free words before the free tokens ("": the tokens open the prompt)
    after: str = ""        # concept-free words after them
    init: str = "random"   # or "concept": the concept word's token embeddings, repeated to fill the tokens
    restarts: int = 1
    discrete: bool = False  # the free tokens stay vocabulary words (a typed prompt), not free vectors
    straight_through: bool = False  # the gates' ramps pass gradients through their clamps (BPDA)


@dataclass
class Optimised:
    """One attack's result: the free token embeddings (tokens, width) of the best restart, its loss
    per step, and its loss on the fixed evaluation batch before and after optimising."""

    vectors: torch.Tensor
    losses: list[float]
    start_loss: float
    final_loss: float


def content_ids(clip, text: str) -> list[int]:
    """The token ids of `text`'s words (no start, end or padding)."""
    return prompt_space(clip).content_ids(text)


def frame(clip, before: str, after: str) -> Frame:
    return prompt_space(clip).frame(before, after)


def conditioning_of(clip, settings: AttackSettings, vectors: torch.Tensor) -> list:
    """The CONDITIONING of the attack's prompt with `vectors` as its free tokens."""
    space = prompt_space(clip)
    prompt = space.frame(settings.before, settings.after)
    with torch.no_grad():
        embedding = space.encode(prompt.embed(vectors))
    return [[embedding.detach(), {} if prompt.pooled is None else {"pooled_output": prompt.pooled}]]


def _gated(state, conditioning: torch.Tensor, base, generator: torch.Generator, runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """(membranes,) gates for the attacker's conditioning (1, 77, D) and the conditioning the model then
    reads, differentiable, computed by the runtime's own code (the pack's nodes.gating module): the
    text gates and, for latent transport, the latent gate's look-ahead from a fresh noise; for guarded
    transport also the breach's look-ahead with the membranes open, which moves a breached prompt
    towards the concept's words."""
    gates = state.gates_for(conditioning, None)[0]
    if not state.reads_model:
        return gates, conditioning
    side = PICTURE_SIDE // 8
    noise = torch.randn(1, 4, side, side, generator=generator)
    sigma = base.model_sampling.sigma_max.reshape(1)
    x = base.model_sampling.noise_scaling(sigma, noise, torch.zeros_like(noise), max_denoise=True)

    def run_model(contexts: torch.Tensor | None, sources: list[int], pooled: torch.Tensor | None, latents: torch.Tensor,
                  step_sigma: torch.Tensor, gates: torch.Tensor | None = None, strengths: torch.Tensor | None = None) -> torch.Tensor:
        rows_context = conditioning[sources] if contexts is None else contexts
        rows = rows_context.shape[0]
        closed = gates is None
        with state.stack.gates_active(torch.zeros(rows, state.stack.membrane_count) if closed else gates,
                                      None if closed else strengths):
            return base.apply_model(latents, step_sigma.reshape(1).expand(rows), c_crossattn=rows_context.to(conditioning)).float()

    sigmas = runtime.latent_gate_sigmas(base.model_sampling, sigma)
    gates = torch.maximum(gates, state.latent_gates(run_model, None, [0], x, sigmas)[0])
    breach, chosen = state.breaches(run_model, None, [0], x, sigmas, gates[None])
    if not bool(breach.any()):
        return gates, conditioning
    return torch.maximum(gates, breach[0].gt(0).float()), state.guarded_inputs(conditioning, None, breach, chosen)[0]


class _Target:
    """The model being attacked: `denoise` runs it on a batch with the membranes gated for the
    attacker's conditioning as SPM Load Membrane would gate them, or bare when it carries none."""

    def __init__(self, lab, model, pooled: torch.Tensor | None) -> None:
        import contextlib

        import comfy.model_management

        self.runtime = lab.pack("nodes.runtime")
        self.state = model.get_attachment(self.runtime.KEY)
        comfy.model_management.load_models_gpu([model])
        self.base = model.model
        if self.state is not None and not self.state.hooks.installed:
            self.state.install_hooks(self.base)
        self.pooled = pooled
        # ComfyUI's Flux blocks add their residuals in place, which backward needs copies of
        self.saved_copies = contextlib.nullcontext if pooled is None else lab.pack("nodes.training").copies_of_saved_activations

    def noised(self, x0: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """`x0` at noise level `sigma` (batch,) as the model's own sampling noises a picture."""
        noise = torch.randn(x0.shape, generator=generator)
        return self.base.model_sampling.noise_scaling(sigma.reshape(-1, 1, 1, 1), noise, x0)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, conditioning: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
        pooled = {} if self.pooled is None else {"y": self.pooled.expand(x.shape[0], -1)}
        with self.saved_copies():
            if self.state is None:
                return self.base.apply_model(x, sigma, c_crossattn=conditioning.expand(x.shape[0], -1, -1), **pooled)
            gates, read = _gated(self.state, conditioning, self.base, generator, self.runtime)
            with self.state.stack.gates_active(gates.expand(x.shape[0], -1)):
                return self.base.apply_model(x, sigma, c_crossattn=read.expand(x.shape[0], -1, -1), **pooled)


def _vocabulary(clip) -> torch.Tensor:
    return prompt_space(clip).table.weight.detach().float()


def typed(clip, vectors: torch.Tensor) -> str:
    """The words a discrete attack's vectors are (the tokenizer's pieces, word marks dropped)."""
    space = prompt_space(clip)
    return " ".join(space.piece(int(i)) for i in nearest_words(_vocabulary(clip), vectors))


def nearest_words(vocabulary: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """The token ids whose embeddings are nearest (Euclidean) to each of `vectors` (tokens, width)."""
    return torch.cdist(vectors.detach().float(), vocabulary).argmin(dim=1)


def _on_vocabulary(vocabulary: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """`soft` with each vector replaced by its nearest word's embedding in the forward pass, the
    gradient passed straight through to `soft`."""
    words = vocabulary[nearest_words(vocabulary, soft)]
    return soft + (words - soft).detach()


def _loss(denoised: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(denoised[:, :3].float(), x0[:, :3])


def _initial(clip, concept: str, settings: AttackSettings, width: int, generator: torch.Generator) -> torch.Tensor:
    if settings.init == "random" and settings.discrete:
        return _vocabulary(clip)[torch.randint(0, _vocabulary(clip).shape[0], (settings.soft_tokens,), generator=generator)]
    if settings.init == "random":
        return torch.randn(settings.soft_tokens, width, generator=generator)
    with torch.no_grad():
        word = prompt_space(clip).table(torch.tensor(content_ids(clip, concept))).float()
    repeated = word.repeat(-(-settings.soft_tokens // word.shape[0]), 1)[: settings.soft_tokens]
    return repeated + CONCEPT_INIT_NOISE * torch.randn(repeated.shape, generator=generator)


def straight_through_ramp(similarity: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """The gates' ramp (spm_core.transport._ramp) with its clamp passed straight through in the
    backward pass (BPDA, Athalye et al. 2018): a gate or breach saturated at 0 or 1 has no gradient,
    which would hide from the attacker which way closes it."""
    linear = (similarity - low) / (high - low)
    return linear + (linear.clamp(0.0, 1.0) - linear).detach()


def optimise(lab, model, concept: str, settings: AttackSettings = AttackSettings()) -> Optimised:
    """The free tokens of `settings`' prompt optimised against `model` (an SPM Load Membrane output, its
    gate differentiated through; or a model without membranes: textual inversion)."""
    if not settings.straight_through:
        return _optimise(lab, model, concept, settings)
    with mock.patch.object(lab.pack("spm_core.transport"), "_ramp", straight_through_ramp):
        return _optimise(lab, model, concept, settings)


def _optimise(lab, model, concept: str, settings: AttackSettings) -> Optimised:
    if settings.init not in INITS:
        raise ValueError(f"attack init must be one of {INITS}, got {settings.init!r}")
    if settings.restarts < 1:
        raise ValueError(f"an attack needs at least one restart, got {settings.restarts}")
    pictures = lab.generate(lab.model, f"a {concept}", settings.reference_pictures, settings.seed)
    reference = pictures_to_model_space(pictures, lab.vae.latent_channels)
    space = prompt_space(lab.clip)
    prompt = space.frame(settings.before, settings.after)
    target = _Target(lab, model, prompt.pooled)
    sigmas = target.base.model_sampling.sigmas.float()
    # one fixed batch (every reference picture at a few noise levels) scores every restart alike;
    # its own generator leaves the optimisation's random stream as it was before restarts existed
    scoring = torch.Generator().manual_seed(settings.seed + 1)
    score_x0 = reference.repeat(EVALUATION_SIGMAS, 1, 1, 1)
    score_sigma = sigmas[torch.randint(0, sigmas.shape[0], (score_x0.shape[0],), generator=scoring)]
    score_x = target.noised(score_x0, score_sigma, scoring)

    vocabulary = _vocabulary(lab.clip)

    def used(soft: torch.Tensor) -> torch.Tensor:
        """What the prompt holds: the free vectors, or for a discrete attack their nearest words
        (exactly, outside the gradient's path)."""
        if not settings.discrete:
            return soft
        return _on_vocabulary(vocabulary, soft) if soft.requires_grad else vocabulary[nearest_words(vocabulary, soft)]

    def score(soft: torch.Tensor) -> float:
        with torch.no_grad():
            conditioning = space.encode(prompt.embed(used(soft)))
            gate_noise = torch.Generator().manual_seed(settings.seed + 2)
            return float(_loss(target.denoise(score_x, score_sigma, conditioning, gate_noise), score_x0))

    best = None
    for restart in range(settings.restarts):
        generator = torch.Generator().manual_seed(settings.seed + 1000 * restart)
        soft = torch.nn.Parameter(_initial(lab.clip, concept, settings, prompt.head.shape[-1], generator))
        start_loss = score(soft.detach())
        optimiser = torch.optim.Adam([soft], lr=settings.learning_rate)
        losses = []
        # a discrete prompt jumps from word to word: the best words seen on the scoring batch are kept
        kept = (start_loss, used(soft.detach()).clone())
        with torch.inference_mode(False), torch.enable_grad():
            for step in range(settings.steps):
                conditioning = space.encode(prompt.embed(used(soft)))
                pick = torch.randint(0, reference.shape[0], (settings.batch,), generator=generator)
                sigma = sigmas[torch.randint(0, sigmas.shape[0], (settings.batch,), generator=generator)]
                x0 = reference[pick]
                x = target.noised(x0, sigma, generator)
                loss = _loss(target.denoise(x, sigma, conditioning, generator), x0)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                losses.append(loss.item())
                if settings.discrete and ((step + 1) % DISCRETE_CHECK_EVERY == 0 or step + 1 == settings.steps):
                    checked = score(soft.detach())
                    kept = min(kept, (checked, used(soft.detach()).clone()), key=lambda pair: pair[0])
        if settings.discrete:
            run = Optimised(kept[1], losses, start_loss, kept[0])
        else:
            run = Optimised(soft.detach().clone(), losses, start_loss, score(soft.detach()))
        if best is None or run.final_loss < best.final_loss:
            best = run
    return best

