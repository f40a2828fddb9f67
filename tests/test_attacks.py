"""Attacks a user has: textual-inversion embedding files used through ComfyUI's own `embedding:`
syntax on the miniature world's CLIP, the checks on such files, and the gradient attack's
optimiser (free tokens anywhere in a prompt, restarts, start from the concept's word)."""

from __future__ import annotations

import os
import pickle
from dataclasses import replace

import pytest
import torch

from lab.attack import AttackSettings, frame, optimise
from lab.harness import Lab
from lab.textual_inversion import embedding_prompt, learn_embedding, load_embedding, save_embedding
from miniworld.model import TEXT_CONFIG, encode_token_embeddings, load_world

WIDTH = TEXT_CONFIG["hidden_size"]
CHEAP = AttackSettings(steps=25, batch=4, reference_pictures=8)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with torch.inference_mode(False):
        return Lab(membrane_dir=str(tmp_path_factory.mktemp("attack_membranes")),
                   embedding_dir=str(tmp_path_factory.mktemp("attack_embeddings")))


def vectors(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, WIDTH, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("before", "after"), [("a", ""), ("a drawing of a", "on a dark background"), ("", "")])
def test_an_embedding_file_enters_the_prompt_through_comfyuis_tokenizer(lab, before, after):
    """The conditioning of "... embedding:<name> ..." is the encoder run on the file's vectors in
    the word's place (where the attack puts its free tokens), not the prompt without the word, and
    not the word read as text."""
    learned = vectors(2, seed=len(before) + len(after))
    name = save_embedding(os.path.join(lab.embedding_dir, f"probe-{len(before)}-{len(after)}.safetensors"), learned)
    prompt = " ".join(part for part in (before, f"embedding:{name}", after) if part)
    through_comfyui = lab.encode(prompt)[0][0]
    direct = encode_token_embeddings(lab.clip, frame(lab.clip, before, after).embed(learned))
    assert torch.allclose(through_comfyui, direct, atol=1e-4)
    without = lab.encode(" ".join(part for part in (before, after) if part))[0][0]
    assert (through_comfyui - without).abs().max() > 0.1
    plain_clip = load_world()[1]  # no embeddings folder: what the shipped CLIP did before
    as_text = plain_clip.encode_from_tokens(plain_clip.tokenize(prompt))
    assert (through_comfyui - as_text).abs().max() > 0.1


def test_the_example_loader_gives_its_clip_comfyuis_embeddings_folder(lab):
    import folder_paths

    from miniworld.comfy_nodes import LoadMiniatureWorld

    clip = LoadMiniatureWorld.execute().result[1]
    assert clip.tokenizer.clip_l.embedding_directory == folder_paths.get_folder_paths("embeddings")
    assert lab.embedding_dir in clip.tokenizer.clip_l.embedding_directory


def test_unusable_embedding_files_are_refused_naming_the_file(lab):
    save_embedding(os.path.join(lab.embedding_dir, "other-model.safetensors"), torch.randn(2, 96))
    with pytest.raises(ValueError, match=r"other-model\.safetensors: its vectors are 96 wide .* 128 wide"):
        embedding_prompt(lab, "other-model")
    with open(os.path.join(lab.embedding_dir, "pickled.pt"), "wb") as handle:
        handle.write(pickle.dumps({"clip_l": [[0.0] * WIDTH]}))
    with pytest.raises(ValueError, match=r"pickled\.pt: not a safetensors embedding file"):
        embedding_prompt(lab, "pickled")
    with pytest.raises(ValueError, match="no embedding file missing"):
        embedding_prompt(lab, "missing")
    good = save_embedding(os.path.join(lab.embedding_dir, "good.safetensors"), vectors(3, seed=1))
    assert embedding_prompt(lab, good) == "a embedding:good"
    assert load_embedding(os.path.join(lab.embedding_dir, "good.safetensors"), WIDTH).shape == (3, WIDTH)


def test_textual_inversion_on_the_bare_model_learns(lab):
    result = learn_embedding(lab, "snowman", 1, settings=CHEAP)
    assert result.vectors.shape == (1, WIDTH)
    assert len(result.losses) == CHEAP.steps
    assert result.final_loss < result.start_loss


def test_the_attack_learns_against_a_gated_membrane_and_a_restart_never_makes_it_worse(lab):
    """A random snowman membrane under the latent gate (the gate read from the bare model's
    prediction and differentiated through); free tokens between words, from the concept's word."""
    from membrane_helpers import key_map_of, modules_of, random_membrane

    from spm_core.file_format import save_membrane

    key_map = key_map_of(lab.model)
    membrane = random_membrane(key_map, modules_of(lab.model, key_map), seed=3, target="snowman", std=0.05)
    save_membrane(os.path.join(lab.membrane_dir, "random-snowman.safetensors"), membrane)
    model = lab.apply(lab.model, "random-snowman.safetensors", "latent")
    settings = AttackSettings(steps=15, batch=4, reference_pictures=8, soft_tokens=2, before="a drawing of a",
                              after="on a dark background", init="concept", restarts=2)
    best = optimise(lab, model, "snowman", settings)
    assert best.final_loss < best.start_loss
    first_only = optimise(lab, model, "snowman", replace(settings, restarts=1))
    assert best.final_loss <= first_only.final_loss


def test_a_discrete_attack_gives_vocabulary_words_that_the_tokenizer_types(lab):
    """Every vector of a discrete attack is a row of the token table (what typing its words gives), its
    words re-typed through ComfyUI's tokenizer give the same conditioning, and the kept words never
    score worse than where the search started."""
    from lab.attack import conditioning_of, typed
    from miniworld.model import text_transformer

    settings = replace(CHEAP, soft_tokens=3, discrete=True, steps=30)
    result = optimise(lab, lab.model, "snowman", settings)
    table = text_transformer(lab.clip).text_model.embeddings.token_embedding.weight.float()
    assert all(bool((table == row).all(dim=1).any()) for row in result.vectors)
    assert result.final_loss <= result.start_loss
    words = typed(lab.clip, result.vectors)
    assert len(words.split()) == 3
    if "<|" not in words:  # a special token typed as text is not read as that token
        typed_prompt = lab.encode(f"a {words}")[0][0]
        assert torch.allclose(typed_prompt, conditioning_of(lab.clip, settings, result.vectors)[0][0], atol=1e-4)


def test_the_straight_through_ramp_gives_a_saturated_gate_a_gradient(lab):
    """BPDA: the forward value is the pack's ramp, clamp included; the backward pass is the line's."""
    from lab.attack import straight_through_ramp

    similarity = torch.tensor([-0.5, 0.3, 0.9], requires_grad=True)
    with torch.enable_grad():
        ramp = straight_through_ramp(similarity, 0.1, 0.6)
        ramp.sum().backward()
    assert torch.equal(ramp.detach(), lab.pack("spm_core.transport")._ramp(similarity.detach(), 0.1, 0.6))
    assert torch.allclose(similarity.grad, torch.full((3,), 2.0))
