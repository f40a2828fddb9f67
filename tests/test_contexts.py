"""The concept in context (spm_core.contexts): prompts of random words with the concept among them,
each erased against the same words without it, beside the concept's own prompt."""

import pytest
import torch
from pack import pack_module
from test_training import config, gated_predictions, train
from tiny_models import build_clip, build_patcher


@pytest.fixture(scope="module")
def tiny(spm_world):
    return build_patcher("sd1", seed=0, prompt_gain=16), build_clip("sd1", seed=1)


def test_context_pairs_put_the_concept_among_the_words_and_its_replacement_without_it():
    concepts, contexts = pack_module("spm_core.concepts"), pack_module("spm_core.contexts")
    erase = contexts.context_texts(concepts.Concept("snoopy"), ["red barn", "moss"])
    assert erase == [("red barn snoopy", "red barn"), ("moss snoopy", "moss")]
    edit = contexts.context_texts(concepts.Concept("snoopy", surrogate="a dog"), ["moss"])
    assert edit == [("moss snoopy", "moss a dog")]


def first_step_losses(patcher, clip, contexts_pool, contexts):
    """The first iteration's erase loss, without anchors (so that the context draw shifts no
    other random draw), with `contexts` context rows drawn from `contexts_pool`."""
    training, core = pack_module("nodes.training"), pack_module("spm_core.training")
    contexts_module = pack_module("spm_core.contexts")
    with torch.inference_mode(False), torch.enable_grad():
        target, empty = training.encode(clip, "snoopy"), training.encode(clip, "")
        concept = core.ConceptPrompts(pack_module("spm_core.concepts").Concept("snoopy"), target, target, empty)
        key_map, shapes = pack_module("nodes.runtime").membrane_layers_of(patcher)
        layer = pack_module("spm_core.file_format").DIFFUSERS_LAYER
        names = {name: key for name, key in key_map.items() if layer.match(name)}
        membrane = core.TrainableMembrane({n: shapes[k] for n, k in names.items()}, rank=1, alpha=1.0, seed=0)
        with torch.no_grad():
            for up in membrane.up:
                up.normal_(std=0.05, generator=torch.Generator().manual_seed(4))  # a membrane that already acts
        membrane.attach({n: patcher.model.get_submodule(k) for n, k in names.items()})
        pool = contexts_module.ContextPrompts([contexts_pool], lambda text: training.encode(clip, text))
        settings = config(iterations=1, anchor_strength=0.0, contexts=contexts)
        try:
            trainer = core.Trainer(training.ComfyNoisePredictor(patcher), membrane, [concept], empty, None, settings, None, pool)
            return trainer.step(0).erase_loss
        finally:
            membrane.detach()


def test_a_context_that_is_the_concepts_own_prompt_is_erased_exactly_as_the_concept(tiny):
    """Context rows are built like the concept's row: with the pair ("snoopy", "") the loss is the
    concept's own, however many rows are drawn; a real context pair changes it."""
    patcher, clip = tiny
    alone = first_step_losses(patcher, clip, [("snoopy", "")], 0)
    assert first_step_losses(patcher, clip, [("snoopy", "")], 3) == pytest.approx(alone, rel=1e-5)
    assert first_step_losses(patcher, clip, [("red barn snoopy", "red barn")], 3) != pytest.approx(alone, rel=1e-3)


def distance_to_erase_target(patcher, clip, membrane, named: str, neutral: str) -> float:
    """How far the membrane-on prediction for `named` is from its erase target, on fixed latents."""
    training = pack_module("nodes.training")
    named_prompt, neutral_prompt = training.encode(clip, named), training.encode(clip, neutral)
    with gated_predictions(patcher, membrane) as eps, torch.no_grad():
        e_named, e_neutral = eps(named_prompt, 0.0), eps(neutral_prompt, 0.0)
        goal = e_neutral - (e_named - e_neutral)
        return float((eps(named_prompt, 1.0) - goal).pow(2).mean())


def test_training_in_context_erases_the_concept_in_sentences_it_never_saw(tiny, tmp_path):
    """Held-out contexts (vocabulary words drawn with a seed training never used): a membrane trained
    with contexts lands nearer their erase targets, on average, than one trained on the concept's
    prompt alone."""
    patcher, clip = tiny
    training, surrogates = pack_module("nodes.training"), pack_module("spm_core.surrogates")
    settings = dict(iterations=30, learning_rate=5e-3, anchor_strength=0.0)
    alone, _, _ = train(patcher, clip, tmp_path / "alone.safetensors", contexts=0, **settings)
    in_context, _, _ = train(patcher, clip, tmp_path / "context.safetensors", contexts=4, **settings)
    held_out = surrogates.random_word_prompts(training.vocabulary_words(clip), {"snoopy"}, 6, seed=999, words_per_prompt=(1, 3))

    def mean_distance(membrane) -> float:
        return sum(distance_to_erase_target(patcher, clip, membrane, f"{words} snoopy", words) for words in held_out) / len(held_out)

    with_contexts, without = mean_distance(in_context), mean_distance(alone)
    print(f"held-out distance: {with_contexts:.5f} with contexts, {without:.5f} without")
    assert with_contexts < without


def test_bad_context_settings_are_refused_by_name(tiny):
    core = pack_module("spm_core.training")
    with pytest.raises(pack_module("spm_core.errors").SPMError, match="contexts 17 is outside 0..16"):
        config(contexts=17).check()
    patcher, clip = tiny
    training = pack_module("nodes.training")
    with torch.inference_mode(False):
        empty = training.encode(clip, "")
    concept = core.ConceptPrompts(pack_module("spm_core.concepts").Concept("snoopy"), empty, empty, empty)
    with pytest.raises(pack_module("spm_core.errors").SPMError, match="contexts needs context prompts"):
        core.Trainer(training.ComfyNoisePredictor(patcher), None, [concept], empty, None, config(contexts=2))
