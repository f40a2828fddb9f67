"""A gradient attack on a membrane, in the spirit of UnlearnDiffAtk (Zhang et al., 2024).

The attacker writes "a" followed by a few free token embeddings (what a textual-inversion file
gives a ComfyUI user) and optimises those embeddings so that the model *with the membrane and its
gate* reproduces pictures of the erased concept: the diffusion loss against the bare model's own
pictures of "a <concept>", at random noise levels. The gate is computed from the attacker's
conditioning exactly as SPM Load Membrane computes it (text gates from the embedding; the latent gate from
the bare model's prediction at the first step), and differentiated through, so the attack adapts
to the gate. The result is then sampled through the real SPM Load Membrane runtime and read by the
classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .lab import PICTURE_SIDE
from .model import encode_token_embeddings, pictures_to_model_space, text_transformer, token_ids


@dataclass(frozen=True)
class AttackSettings:
    soft_tokens: int = 3
    steps: int = 150
    learning_rate: float = 0.1
    batch: int = 8
    reference_pictures: int = 32
    seed: int = 0


def _gates(state, conditioning: torch.Tensor, base, generator: torch.Generator) -> torch.Tensor:
    """(membranes,) gates for the attacker's conditioning (1, 77, D), differentiable, computed by the
    runtime's own code: the text gates and, for latent transport, the latent gate at a fresh noise."""
    gates = state.gates_for(conditioning, None)
    if not state.reads_model:
        return gates
    side = PICTURE_SIDE // 8
    noise = torch.randn(1, 4, side, side, generator=generator)
    sigma = base.model_sampling.sigma_max.reshape(1)
    x = base.model_sampling.noise_scaling(sigma, noise, torch.zeros_like(noise))

    def run_bare(rows_x: torch.Tensor, rows_context: torch.Tensor) -> torch.Tensor:
        return base.apply_model(rows_x, sigma.expand(rows_x.shape[0]), c_crossattn=rows_context.to(conditioning)).float()

    return torch.maximum(gates, state.latent_gates(run_bare, x, conditioning)[0])


def with_soft_tokens(template: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """The token embeddings of "<BOS> a" (template (1, 77, D)), then the free tokens, then the
    template's end token and padding, cut to the template's length."""
    length, first = template.shape[1], 2
    return torch.cat([template[:, :first], soft[None], template[:, first: length - soft.shape[0]]], dim=1)


def attack(lab, model, concept: str, settings: AttackSettings = AttackSettings()) -> tuple[list, list[float]]:
    """(CONDITIONING for the optimised prompt, loss per step) against `model`, an SPM Load Membrane output."""
    import comfy.model_management

    stack_module = lab.pack("spm_core.stack")
    state = lab.pack("nodes.runtime").state_of(model)
    generator = torch.Generator().manual_seed(settings.seed)
    reference = pictures_to_model_space(lab.generate(lab.model, f"a {concept}", settings.reference_pictures, settings.seed))

    comfy.model_management.load_models_gpu([model])
    base = model.model
    if not state.hooks.installed:
        state.hooks.install(state.modules_of(base))
    text = text_transformer(lab.clip).text_model
    ids = torch.tensor([token_ids(lab.clip, "a")])
    with torch.no_grad():
        template = text.embeddings.token_embedding(ids).float()
    soft = torch.nn.Parameter(torch.randn(settings.soft_tokens, template.shape[-1], generator=generator))
    optimiser = torch.optim.Adam([soft], lr=settings.learning_rate)
    sigmas = base.model_sampling.sigmas.float()
    losses = []
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(settings.steps):
            conditioning = encode_token_embeddings(lab.clip, with_soft_tokens(template, soft))
            gates = _gates(state, conditioning, base, generator)
            pick = torch.randint(0, reference.shape[0], (settings.batch,), generator=generator)
            sigma = sigmas[torch.randint(0, sigmas.shape[0], (settings.batch,), generator=generator)]
            x0 = reference[pick]
            x = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=generator)
            with stack_module.gates_active(state.stack, gates.expand(settings.batch, -1)):
                denoised = base.apply_model(x, sigma, c_crossattn=conditioning.expand(settings.batch, -1, -1))
            loss = torch.nn.functional.mse_loss(denoised[:, :3].float(), x0[:, :3])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
    with torch.no_grad():
        conditioning = encode_token_embeddings(lab.clip, with_soft_tokens(template, soft))
    return [[conditioning.detach(), {}]], losses
