"""Adversarial training in token space: free token embeddings encoded by the checkpoint's own text
encoder through ComfyUI's embedding path, searched against the membrane and erased beside the target."""

import pytest
import torch
from pack import pack_module
from test_training import train
from tiny_models import build_clip, build_patcher


@pytest.fixture(scope="module")
def tiny(spm_world):
    return build_patcher("sd1", seed=0, prompt_gain=16), build_clip("sd1", seed=1)


def soft_prompts(clip, concept="snoopy"):
    return pack_module("nodes.soft_prompts").ClipSoftPrompts(clip, [concept])


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_soft_tokens_encode_as_an_embedding_would_and_carry_gradients(arch, spm_world):
    """The tokens reach every encoder at the place a textual-inversion embedding would, the result is
    ComfyUI's own encoding of those tokens, and its gradient is the true derivative (checked against
    a central difference), although ComfyUI's CLIP layers add their residuals in place."""
    clip = build_clip(arch, seed=5)
    soft = soft_prompts(clip)
    tokens = soft.initial(0, 2, torch.Generator().manual_seed(0))
    assert len(tokens) == (2 if arch == "sdxl" else 1)

    template = clip.tokenize("a")
    by_comfy = {key: [row[0][:2] + [(t, 1.0) for t in free] + row[0][2:-2]]
                for (key, row), free in zip(sorted(template.items()), tokens)}
    expected, expected_pooled = clip.encode_from_tokens(by_comfy, return_pooled=True)

    with torch.inference_mode(False), torch.enable_grad():
        variables = [t.clone().requires_grad_(True) for t in tokens]
        prompt = soft.encode(variables)
        torch.testing.assert_close(prompt.embedding, expected[0].float())
        torch.testing.assert_close(prompt.pooled, expected_pooled[0].float())
        direction = [torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) for t in tokens]
        weights = torch.randn(prompt.embedding.shape, generator=torch.Generator().manual_seed(2))
        gradients = torch.autograd.grad((prompt.embedding * weights).sum(), variables)
    assert all(g.abs().max() > 0 for g in gradients), "every encoder's tokens get a gradient"

    def value(step: float) -> float:
        moved = [t + step * d for t, d in zip(tokens, direction)]
        return float((soft.encode(moved).embedding.double() * weights).sum())

    step = 1e-2
    numeric = (value(step) - value(-step)) / (2 * step)
    analytic = float(sum((g.double() * d).sum() for g, d in zip(gradients, direction)))
    assert analytic == pytest.approx(numeric, rel=2e-2, abs=1e-3)


def test_searches_start_from_the_concepts_words_then_from_random_vocabulary(spm_world):
    clip = build_clip("sd1", seed=5)
    soft = soft_prompts(clip, "van gogh")
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight
    words = [t for t, _ in clip.tokenize("van gogh")["l"][0][1:3]]
    generator = torch.Generator().manual_seed(0)
    first, second = soft.initial(0, 3, generator)[0], soft.initial(0, 3, generator)[0]
    torch.testing.assert_close(first, table[torch.tensor([words[0], words[1], words[0]])].float())
    assert not any(torch.equal(row, word) for row in second for word in table[torch.tensor(words)].float())


def make_trainer(patcher, clip, **overrides):
    """spm_core's Trainer over the tiny model, set up as nodes/training.py sets it up."""
    training, core = pack_module("nodes.training"), pack_module("spm_core.training")
    concepts = pack_module("spm_core.concepts")
    surrogates = pack_module("spm_core.surrogates")
    values = dict(iterations=4, learning_rate=2e-2, latent_sizes=[8], rollout_steps=6, anchor_strength=3.0,
                  anchor_samples=1, adversaries=2, adversary_every=1, adversary_steps=6, contexts=0)
    values.update(overrides)
    config = core.TrainingConfig(**values)
    modules = training.trained_layers(patcher, config.single_blocks)
    membrane = core.TrainableMembrane.for_modules(modules, 1, 1.0, 0)
    membrane.attach(modules, pack_module("nodes.architectures").text_stream_blocks(patcher.model))
    target, empty = training.encode(clip, "snoopy"), training.encode(clip, "")
    prompts = [core.ConceptPrompts(concepts.Concept("snoopy"), target, target, empty)]
    sampler = surrogates.PromptSurrogates(["a house", "a tree"], lambda text: training.encode(clip, text))
    soft = soft_prompts(clip) if config.adversary_space == "tokens" else None
    return core.Trainer(training.ComfyNoisePredictor(patcher), membrane, prompts, empty, sampler, config, soft), membrane


def test_each_token_search_finds_a_prompt_the_membrane_lets_through_better_than_where_it_started(tiny):
    patcher, clip = tiny
    trainer, membrane = make_trainer(patcher, clip)
    try:
        with torch.inference_mode(False):
            trainer.run()
    finally:
        membrane.detach()
    assert len(trainer.searches) == 4 and len(trainer.aliases) == 2
    assert all(last < first for first, last in trainer.searches), trainer.searches
    assert trainer.adversary_seconds > 0


@pytest.mark.parametrize("space", ["tokens", "conditioning"])
def test_aliases_are_searched_and_erased_beside_the_target(tiny, tmp_path, space):
    """Every `adversary_every` iterations `adversary_steps` single-row predictions search an alias,
    and the bank's aliases join the erased rows of the membrane-on batch. Same seeds draw the same
    rollouts and anchors, so the extra rows are exactly those."""
    patcher, clip = tiny
    common = dict(iterations=4, anchor_samples=1)
    _, plain_reports, plain_rows = train(patcher, clip, tmp_path / "plain.safetensors", **common)
    membrane, reports, rows = train(patcher, clip, tmp_path / f"{space}.safetensors", adversaries=2, adversary_every=1,
                                    adversary_steps=3, adversary_space=space, **common)
    searched, erased_aliases = 4 * 3, 1 + 2 + 2 + 2
    assert rows * 4 == pytest.approx(plain_rows * 4 + searched + erased_aliases)
    assert reports[0].erase_loss != plain_reports[0].erase_loss, "the alias is part of the erase loss"
    assert membrane.metadata["training"]["adversary_space"] == space


@pytest.mark.parametrize("overrides, message", [
    ({"adversary_tokens": 0}, "adversary tokens 0 is outside 1..16"),
    ({"adversary_tokens": 17}, "adversary tokens 17 is outside 1..16"),
    ({"adversary_space": "words"}, "adversary space 'words' is not one of 'tokens', 'conditioning'"),
    ({"adversary_learning_rate": float("nan")}, "adversary learning rate nan is outside"),
])
def test_bad_robustness_settings_are_refused_by_name_and_nothing_is_written(tiny, tmp_path, overrides, message):
    patcher, clip = tiny
    errors = pack_module("spm_core.errors")
    with pytest.raises(errors.SPMError, match=message):
        train(patcher, clip, tmp_path / "bad.safetensors", adversaries=2, **overrides)
    assert list(tmp_path.iterdir()) == []


def test_token_search_without_a_text_encoder_is_refused(tiny):
    patcher, clip = tiny
    errors, core = pack_module("spm_core.errors"), pack_module("spm_core.training")
    trainer, membrane = make_trainer(patcher, clip, adversary_space="tokens")
    membrane.detach()
    with pytest.raises(errors.SPMError, match="needs the text encoder"):
        core.Trainer(trainer.model, membrane, trainer.concepts, trainer.empty, trainer.surrogates, trainer.config, None)
