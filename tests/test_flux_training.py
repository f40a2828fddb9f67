"""Latent Anchoring training on Flux.1 and Chroma (issue 17, deliver 3), on tiny models built from
ComfyUI's classes (tests/tiny_models.py) with Flux's own text encoders.

What is checked: the model adapter conditions Flux as ComfyUI's samplers do (T5 context, pooled
CLIP-L `y`, guidance 3.5) and returns the velocity; rollouts follow the model's own sampling (the
'simple' sigmas of ModelSamplingFlux with its shift, starting at pure noise, CFG 1 on guidance-
distilled Flux); training lowers the erase loss and moves the target's prediction toward the erase
target; the file says architecture flux, loads in SPM Load Membrane with transport tokens and
changes only the prompts naming the concept; Chroma (T5 without padding: prompts of different
lengths) trains too; bad input is refused before anything is trained or written.

Margins come from measured runs (60 iterations, lr 5e-2, 8x8 latents, 10 rollout steps, seed 0,
text values x8). Flux, anchors at lambda 1: erase loss ~0.57x, distance to the erase target ~0.77x,
held-out prompts drifted ~8% against ~20% without anchoring; the target itself moved ~9%, as much
as the held-out prompts (on the tiny T5 the padding tokens, 250 of 256, are the same vector for
every prompt, so what a membrane does to them it does to every prompt: on Flux the token gate, not
the membrane, keeps other prompts apart; 200 iterations: 14% against 11%; with its update masked to
the prompt's content tokens the trained membrane changes the target by 0.2% instead of 8.9%: it acts
through the padding). Chroma (no padding),
lambda 3: erase loss ~0.24x, distance ~0.74x, the target moved ~64%, held-out prompts ~14%.
"""

from __future__ import annotations

import os
import shutil
import statistics

import pytest
import torch
from pack import load_spm, node, pack_module
from test_flux import UNRELATED, basic_guider_sample
from test_flux import encode as flux_encode
from test_training import HELD_OUT, gated_predictions, train
from tiny_models import build_chroma_clip, build_chroma_patcher, build_flux_clip, build_flux_patcher

SETTINGS = dict(learning_rate=5e-2, anchor_strength=1.0)


def evaluate(patcher, clip, membrane) -> dict[str, float]:
    """On fixed latents at two noise levels: the distance of the target's prediction to the erase
    target before and after (gate 0 / gate 1), how far the target's prediction moved, and how far
    held-out prompts' moved (relative to each prediction)."""
    training = pack_module("nodes.training")
    with gated_predictions(patcher, membrane, sigmas=(0.9, 0.9, 0.5, 0.5)) as eps:

        def moved(prompt) -> float:
            return ((eps(prompt, 1.0) - eps(prompt, 0.0)).norm() / eps(prompt, 0.0).norm()).item()

        target, neutral = training.encode(clip, "snoopy"), training.encode(clip, "")
        bare, bare_neutral = eps(target, 0.0), eps(neutral, 0.0)
        erase_target = bare_neutral - (bare - bare_neutral)
        return {"before": (bare - erase_target).norm().item(), "after": (eps(target, 1.0) - erase_target).norm().item(),
                "target_moved": moved(target),
                "held_out_moved": statistics.mean(moved(training.encode(clip, text)) for text in HELD_OUT)}


@pytest.fixture(scope="module")
def flux():
    pack_module("nodes")
    return build_flux_patcher(seed=3, prompt_gain=8), build_flux_clip(seed=4)


@pytest.fixture(scope="module")
def runs(flux, tmp_path_factory):
    patcher, clip = flux
    folder = tmp_path_factory.mktemp("flux_trained")
    results = {}
    for label, anchor in (("anchored", SETTINGS["anchor_strength"]), ("unanchored", 0.0)):
        membrane, reports, rows = train(patcher, clip, folder / f"{label}.safetensors",
                                        **{**SETTINGS, "anchor_strength": anchor})
        results[label] = (membrane, reports, rows, evaluate(patcher, clip, membrane))
        print(label, "erase", reports[0].erase_loss, "->", reports[-1].erase_loss, results[label][3], "rows", rows)
    return results, folder


def test_the_adapter_conditions_flux_as_comfyui_samples_it_and_returns_the_velocity(flux):
    """T5 as context, the pooled CLIP-L vector as `y`, guidance 3.5 (FluxGuidance's and ComfyUI's
    default): the adapter's prediction is the model's own output, the velocity noise - image that
    ComfyUI's Euler sampler follows."""
    patcher, clip = flux
    training = pack_module("nodes.training")
    prompt = training.encode(clip, "snoopy")
    generator = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 16, 8, 8, generator=generator), torch.tensor([0.8, 0.3])
    velocity = patcher.model.diffusion_model(x, sigma, context=prompt.embedding[None].repeat(2, 1, 1),
                                             y=prompt.pooled[None].repeat(2, 1), guidance=torch.full((2,), 3.5))
    predicted = training.ComfyNoisePredictor(patcher).eps(x, sigma, [prompt, prompt])
    assert torch.allclose(predicted, velocity, atol=1e-5, rtol=1e-4)
    other_guidance = patcher.model.diffusion_model(x, sigma, context=prompt.embedding[None].repeat(2, 1, 1),
                                                   y=prompt.pooled[None].repeat(2, 1), guidance=torch.full((2,), 1.0))
    assert not torch.allclose(predicted, other_guidance, atol=1e-4), "the guidance input must reach the model"


def test_rollouts_follow_the_models_own_sampling(flux):
    """The simple schedule of the model's sampling (shift included: ModelSamplingFlux patches it),
    starting at sigma 1 from pure noise, as ComfyUI's Flux workflows sample."""
    import comfy.samplers
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    patcher, _ = flux
    training = pack_module("nodes.training")
    predictor = training.ComfyNoisePredictor(patcher)
    sigmas = predictor.sigmas(10)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert torch.equal(sigmas, comfy.samplers.calculate_sigmas(patcher.model.model_sampling, "simple", 10))
    noise = torch.randn(1, 16, 8, 8)
    assert torch.equal(predictor.start(noise, sigmas[0]), noise)
    shifted = ModelSamplingFlux().patch(patcher, 1.15, 0.5, 512, 512)[0]  # the shift for 512 px (0.73)
    expected = comfy.samplers.calculate_sigmas(shifted.get_model_object("model_sampling"), "simple", 10)
    assert torch.equal(training.ComfyNoisePredictor(shifted).sigmas(10), expected)
    assert not torch.allclose(expected, sigmas)


def test_flux_training_lowers_the_erase_loss_and_moves_the_target_to_the_erase_target(runs):
    _, reports, _, measured = runs[0]["anchored"]
    erase = [r.erase_loss for r in reports]
    assert statistics.mean(erase[-10:]) < 0.75 * statistics.mean(erase[:10])
    assert measured["after"] < 0.9 * measured["before"]


def test_flux_anchoring_keeps_held_out_prompts_in_place(runs):
    anchored, unanchored = runs[0]["anchored"][3], runs[0]["unanchored"][3]
    assert anchored["held_out_moved"] < 0.6 * unanchored["held_out_moved"]


def test_flux_rollouts_run_at_cfg_1_without_an_uncond_row(runs):
    """Flux.1 is sampled at CFG 1 (its guidance is a model input): the rollout of k steps costs k rows,
    not 2k (k in [1, 10)), beside 2 + 3 rows off and 1 + 3 on (2 anchors and the empty prompt)."""
    membrane, _, rows, _ = runs[0]["anchored"]
    assert membrane.metadata["training"]["rollout_cfg"] == 1.0
    assert 1 + 9 <= rows <= 9 + 9
    assert rows < 2 * 5 + 9 - 2, "about half the rows a CFG'd rollout takes"


def test_the_flux_file_loads_as_flux_and_gates_by_tokens_in_spm_load_membrane(runs, flux, spm_world):
    patcher, clip = flux
    _, _, folder = spm_world
    path = runs[1] / "anchored.safetensors"
    saved = pack_module("spm_core.file_format").load_membrane(str(path))
    assert saved.architecture == "flux" and [c.target for c in saved.concepts] == ["snoopy"]
    assert set(saved.layers) == set(pack_module("nodes.training").trained_layers(patcher, single_blocks=False))
    shutil.copy(path, folder / "trained_flux_snoopy.safetensors")
    model = load_spm(patcher, clip, "trained_flux_snoopy.safetensors", transport="tokens")
    named, unrelated = flux_encode(clip, "a photo of snoopy"), flux_encode(clip, UNRELATED)
    assert not torch.equal(basic_guider_sample(model, named), basic_guider_sample(patcher, named))
    assert torch.equal(basic_guider_sample(model, unrelated), basic_guider_sample(patcher, unrelated))


def test_chroma_trains_with_prompts_of_different_lengths(tmp_path):
    """Chroma's T5 is not padded, so the target, the empty prompt and the anchors are of different
    lengths: each length is its own model call, as in ComfyUI's samplers. Chroma is sampled with CFG,
    so its rollouts keep the uncond row."""
    patcher, clip = build_chroma_patcher(seed=3, prompt_gain=8), build_chroma_clip(seed=4)
    membrane, reports, _ = train(patcher, clip, tmp_path / "chroma.safetensors", learning_rate=5e-2,
                                    anchor_strength=3.0)
    erase = [r.erase_loss for r in reports]
    assert statistics.mean(erase[-10:]) < 0.5 * statistics.mean(erase[:10])
    measured = evaluate(patcher, clip, membrane)
    assert measured["after"] < 0.85 * measured["before"]
    assert measured["held_out_moved"] < 0.5 * measured["target_moved"]
    assert membrane.architecture == "flux" and membrane.metadata["training"]["rollout_cfg"] == 3.0


def test_anchor_words_come_from_each_text_encoders_vocabulary(flux):
    training = pack_module("nodes.training")
    flux_words = training.vocabulary_words(flux[1])  # Flux's CLIP-L: the BPE vocabulary
    chroma_words = training.vocabulary_words(build_chroma_clip(seed=4))  # T5 only: its sentencepiece words
    for words in (flux_words, chroma_words):
        assert len(words) > 5000 and all(w.isalpha() and len(w) >= 3 for w in words)
    assert "house" in flux_words and "house" in chroma_words


def test_bad_flux_training_input_is_refused_by_name_before_anything_is_written(flux, tmp_path):
    """A target longer than Flux's text window (CLIP-L's 75 tokens bind first: T5 pads to 256 and no text
    fits one CLIP chunk but needs more than 256 T5 tokens), and the token-space adversary search, which
    searches CLIP token embeddings while Flux reads T5."""
    patcher, clip = flux
    errors = pack_module("spm_core.errors")
    path = tmp_path / "bad.safetensors"
    with pytest.raises(errors.SPMError, match=r"the target 'lighthouse lighthouse .*' is longer than one CLIP chunk"):
        train(patcher, clip, path, targets=(" ".join(["lighthouse"] * 90),))
    with pytest.raises(errors.SPMError, match=r"adversary space 'tokens' .* Flux reads T5 text: set adversary space to "
                                              r"'conditioning'"):
        train(patcher, clip, path, adversaries=1)
    assert not os.path.exists(path) and not os.listdir(tmp_path)


def test_the_command_line_loads_a_diffusion_model_file_and_its_text_encoders(tmp_path):
    """scripts/train_spm.py with --text-encoder loads the diffusion model as UNETLoader does and the text
    encoders as DualCLIPLoader does (how Flux.1 is distributed: flux1-dev.safetensors, clip_l, t5xxl).
    ComfyUI's loaders detect Flux only at its full widths, so the files here are the tiny SD1.5
    checkpoint's UNet and CLIP-L split apart; a checkpoint without its text encoder is refused by name."""
    import argparse

    import comfy.utils

    from lab.tiny_assets import cached_checkpoint
    from scripts.train_spm import load_models

    whole = comfy.utils.load_torch_file(cached_checkpoint(), safe_load=True)
    unet = {key: value for key, value in whole.items() if key.startswith("model.diffusion_model.")}
    text = {key[len("cond_stage_model.transformer."):]: value for key, value in whole.items()
            if key.startswith("cond_stage_model.transformer.")}
    comfy.utils.save_torch_file(unet, str(tmp_path / "unet.safetensors"))
    comfy.utils.save_torch_file(text, str(tmp_path / "clip_l.safetensors"))

    def options(**values) -> argparse.Namespace:
        return argparse.Namespace(**{"checkpoint": str(tmp_path / "unet.safetensors"), "text_encoder": [],
                                     "text_encoder_type": "flux", **values})

    model, clip = load_models(options(text_encoder=[str(tmp_path / "clip_l.safetensors")],
                                      text_encoder_type="stable_diffusion"))
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert type(model.model.model_config).__name__ == "SD15"
    assert torch.equal(model.model.state_dict()[key], whole["model." + key])
    assert clip.encode_from_tokens(clip.tokenize("snoopy")).shape == (1, 77, 768)
    with pytest.raises(SystemExit, match=r"--text-encoder-type 'fluxx' is not one of stable_diffusion, .*flux"):
        load_models(options(text_encoder=[str(tmp_path / "clip_l.safetensors")], text_encoder_type="fluxx"))
    with pytest.raises(SystemExit, match=r"unet.safetensors holds no text encoder: give its text encoder files with "
                                         r"--text-encoder \(Flux.1: clip_l and t5xxl\)"):
        load_models(options())


def test_the_train_node_returns_a_flux_model_gated_by_tokens(flux, spm_world):
    """SPM Train Membrane on Flux: the file is saved and the model it returns carries the membrane behind
    the token gate (the paper's whole-prompt cosine is refused on T5 text)."""
    patcher, clip = flux
    _, _, folder = spm_world
    model, _, path = node("SPMTrain").execute(
        model=patcher, clip=clip, target="snoopy", surrogate="", neutral="", iterations=2, learning_rate=1e-3, rank=1,
        alpha=1.0, anchor_strength=1.0, anchor_samples=1, surrogate_sampler="prompts", erase_guidance=1.0,
        rollout_steps=2, latent_size=8, seed=0, name="node_flux_snoopy", resume=False, overwrite=True, contexts=0).result
    state = model.get_attachment(pack_module("nodes.runtime").KEY)
    assert os.path.exists(path) and [e.transport.mode.value for e in state.entries] == ["tokens"]
    named, unrelated = flux_encode(clip, "a photo of snoopy"), flux_encode(clip, UNRELATED)
    assert not torch.equal(basic_guider_sample(model, named), basic_guider_sample(patcher, named))
    assert torch.equal(basic_guider_sample(model, unrelated), basic_guider_sample(patcher, unrelated))
