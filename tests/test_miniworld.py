"""The miniature world's parts: drawing and captions, the model built from ComfyUI's classes, its
training-time text encoder, its VAE, its loader node, and the shipped files."""

from __future__ import annotations

import os

import numpy as np
import torch

from miniworld import world
from miniworld.classifier import GARBAGE_KINDS, OBJECT_CLASSES, classify, garbage_batch, labelled_batch, load_classifier
from miniworld.model import (
    CLASSIFIER_FILE,
    DATA_MEAN,
    MODEL_FILE,
    PixelVAE,
    build_clip,
    encode_ids,
    init_for_training_,
    load_world,
    model_space_to_pictures,
    pictures_to_model_space,
    text_transformer,
    token_ids,
)


def test_world_is_deterministic_and_every_concept_is_captioned():
    first = [world.render(world.random_scene(np.random.default_rng(5)), np.random.default_rng(6)) for _ in range(3)]
    second = [world.render(world.random_scene(np.random.default_rng(5)), np.random.default_rng(6)) for _ in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    rng = np.random.default_rng(0)
    captions = " ".join(world.caption(world.random_scene(rng), rng) for _ in range(3000))
    for concept in world.CONCEPTS:
        for synonym in concept.synonyms:
            assert synonym in captions, f"{synonym!r} ({concept.name}) never appears in a training caption"
    assert len(world.CONCEPTS) >= 12 and len({c.family for c in world.CONCEPTS}) == 4


def test_data_mean_matches_the_world():
    rng = np.random.default_rng(0)
    pictures = torch.from_numpy(np.stack([world.render(world.random_scene(rng), rng) for _ in range(4000)]))
    mean = pictures_to_model_space(pictures).mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(DATA_MEAN), atol=2e-3)


def test_drawn_concepts_differ():
    rng = np.random.default_rng(1)
    pictures = {name: world.render(world.Scene(name, "red" if name in ("circle", "square", "triangle", "cross") else None,
                                               False), rng) for name in world.OBJECT_NAMES}
    names = list(pictures)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.abs(pictures[a] - pictures[b]).mean() > 0.02, f"{a} and {b} look the same"


def test_training_text_encoder_matches_comfyui_forward():
    clip = build_clip()
    init_for_training_(text_transformer(clip).text_model, 3)
    with torch.no_grad():
        text_transformer(clip).text_model.embeddings.token_embedding.weight.normal_()
    prompts = ["a red circle", "a striped snow man", ""]
    ids = torch.tensor([token_ids(clip, p) for p in prompts])
    ours = encode_ids(clip, ids)
    comfy = torch.cat([clip.encode_from_tokens(clip.tokenize(p)) for p in prompts])
    assert torch.allclose(ours, comfy, atol=1e-5), (ours - comfy).abs().max()


def test_pixel_vae_round_trip_and_upscale():
    pictures = torch.rand(2, 3, 16, 16)
    vae = PixelVAE()
    latent = pictures_to_model_space(pictures) / 0.18215
    decoded = vae.decode(latent)
    assert decoded.shape == (2, 128, 128, 3)
    assert torch.allclose(decoded[:, 4::8, 4::8].permute(0, 3, 1, 2), pictures, atol=1e-6)
    assert torch.allclose(vae.encode(decoded), latent, atol=1e-4)
    assert torch.allclose(model_space_to_pictures(pictures_to_model_space(pictures)), pictures, atol=1e-6)


def test_shipped_files_are_small_and_load_into_comfyui_classes():
    from miniworld import dit

    shipped = (MODEL_FILE, CLASSIFIER_FILE, dit.MODEL_FILE)
    assert sum(os.path.getsize(f) for f in shipped) <= 15 * 1024 * 1024, "the miniature worlds' budget is 15 MB in all"
    patcher, clip, _ = load_world()
    assert type(patcher.model.model_config).__name__ == "SD15"
    assert all(torch.isfinite(p).all() for p in patcher.model.parameters())
    assert clip.encode_from_tokens(clip.tokenize("a snowman")).shape == (1, 77, 128)


def test_classifier_reads_held_out_renders():
    classifier = load_classifier(CLASSIFIER_FILE)
    pictures, objects, _, _, clean = labelled_batch(np.random.default_rng(777), 256)
    renders = clean.bool()
    verdicts = classify(classifier, pictures[renders])
    accuracy = np.mean([v.obj == OBJECT_CLASSES[o] for v, o in zip(verdicts, objects[renders].tolist())])
    assert accuracy >= 0.9
    assert np.mean([v.is_clean for v in verdicts]) >= 0.95


def test_classifier_says_garbage_is_not_a_clean_picture():
    """Held-out garbage of every kind (a seed training never drew from) is mostly read as not clean;
    uniform noise, which the object head alone reads as some object, always."""
    classifier = load_classifier(CLASSIFIER_FILE)
    rng = np.random.default_rng(778)
    caught = {kind: np.mean([not v.is_clean for v in classify(classifier, garbage_batch(rng, kind, 128))])
              for kind in GARBAGE_KINDS}
    assert min(caught.values()) >= 0.8, caught
    assert np.mean(list(caught.values())) >= 0.9, caught
    assert not any(v.is_clean for v in classify(classifier, torch.rand(128, 3, 16, 16, generator=torch.Generator().manual_seed(0))))


def test_membranes_bind_through_comfyuis_key_map():
    """7 transformer blocks (8x8 and 4x4 down, middle, 4 up) x 12 adapted modules, mapped by ComfyUI."""
    import comfy.lora

    from spm_core.file_format import is_membrane_layer

    patcher, _, _ = load_world()
    keys = comfy.lora.model_lora_keys_unet(patcher.model, {})
    assert keys["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"] == \
        "diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"
    assert len({v for k, v in keys.items() if is_membrane_layer(k)}) == 7 * 12
