"""Facilitated Transport gates against hand-computed values (with the real CLIP tokenizer:
tests/test_clip_token_overlap.py)."""

import math

import pytest
import torch

from spm_core.errors import SPMError
from spm_core.transport import (
    LATENT_LOOKAHEAD_CFG,
    ConceptEmbedding,
    Transport,
    TransportMode,
    chunked_flat_cosine,
    look_ahead,
)


def embedding(*rows):
    """A (len(rows), 2) embedding from literal rows."""
    return torch.tensor(rows, dtype=torch.float32)


# Concept (2 tokens x 2 dims) flattened = [1, 0, 0, 1]; prompt A flattened = [1, 0, 1, 0]:
# cos = 1 / (sqrt 2 · sqrt 2) = 0.5. Prompt B = [0, 1, 0, 0]: cos = 0. Prompt C = concept x 3: cos = 1.
CONCEPT = embedding([1, 0], [0, 1])
PROMPT_A = embedding([1, 0], [1, 0])
PROMPT_B = embedding([0, 1], [0, 0])
PROMPT_C = embedding([3, 0], [0, 3])


def test_flat_cosine_hand_values():
    rows = torch.stack([PROMPT_A, PROMPT_B, PROMPT_C])
    got = chunked_flat_cosine(rows, CONCEPT[None])
    assert torch.allclose(got[:, 0], torch.tensor([0.5, 0.0, 1.0]), atol=1e-6)


def test_long_prompts_use_their_best_chunk():
    long_prompt = torch.cat([PROMPT_B, PROMPT_A])[None]  # two 2-token chunks: cos 0 and 0.5
    assert chunked_flat_cosine(long_prompt, CONCEPT[None]).item() == pytest.approx(0.5)


def test_paper_gate_is_max_of_cosine_and_overlap_per_membrane():
    # membrane 0 has two concepts (the max counts), membrane 1 one
    other = embedding([0, 1], [1, 0])  # flat [0, 1, 1, 0]: cos with A = 1/2, with B = 1/sqrt2
    transport = Transport(
        [[ConceptEmbedding(CONCEPT, frozenset({10, 11})), ConceptEmbedding(other, frozenset({12}))],
         [ConceptEmbedding(CONCEPT, frozenset({20}))]],
        TransportMode.PAPER)
    rows = torch.stack([PROMPT_A, PROMPT_B])
    tokens = [frozenset({10, 99}), frozenset({20})]
    gates = transport.gates(rows, tokens)
    # row A: membrane 0 = max(cos .5, overlap 1/2, cos .5, overlap 0) = .5; membrane 1 = max(.5, 0) = .5
    # row B: membrane 0 = max(0, 0, 1/sqrt2, 0) = .7071; membrane 1 = max(0, overlap 1) = 1
    expected = torch.tensor([[0.5, 0.5], [1 / math.sqrt(2), 1.0]])
    assert torch.allclose(gates, expected, atol=1e-6)


def test_cosine_mode_ignores_tokens_and_paper_mode_without_tokens_is_cosine():
    concepts = [[ConceptEmbedding(CONCEPT, frozenset({20}))]]
    rows = PROMPT_B[None]
    assert Transport(concepts, TransportMode.COSINE).gates(rows, [frozenset({20})]).item() == 0.0
    assert Transport(concepts, TransportMode.PAPER).gates(rows, None).item() == 0.0
    assert Transport(concepts, TransportMode.PAPER).gates(rows, [frozenset({20})]).item() == 1.0


def test_calibrated_mode_removes_the_shared_part_and_closes_unrelated_prompts():
    empty = embedding([5, 5], [5, 5])  # a large shared component, as BOS/padding give in CLIP
    concept = empty + CONCEPT
    related, unrelated = empty + PROMPT_C, empty + PROMPT_B
    transport = Transport([[ConceptEmbedding(concept)]], TransportMode.CALIBRATED, empty=empty, threshold=0.3, saturation=0.7)
    paper = Transport([[ConceptEmbedding(concept)]], TransportMode.PAPER)
    rows = torch.stack([related, unrelated])
    assert paper.gates(rows)[1].item() > 0.9, "uncentred cosine barely tells them apart"
    gates = transport.gates(rows)
    assert gates[0].item() == 1.0 and gates[1].item() == 0.0
    # cos 0.5 after centring lies halfway between threshold .3 and saturation .7 -> 0.5
    assert transport.gates((empty + PROMPT_A)[None]).item() == pytest.approx(0.5, abs=1e-6)


def test_always_open_and_bad_configurations():
    assert torch.equal(Transport([[], []], TransportMode.ALWAYS_OPEN).gates(torch.zeros(3, 2, 2)), torch.ones(3, 2))
    with pytest.raises(SPMError, match="has no concepts"):
        Transport([[]], TransportMode.PAPER)
    with pytest.raises(SPMError, match="empty prompt's embedding"):
        Transport([[ConceptEmbedding(CONCEPT)]], TransportMode.CALIBRATED)
    with pytest.raises(SPMError, match="unknown transport mode 'fuzzy'"):
        TransportMode.named("fuzzy")
    with pytest.raises(SPMError, match="different text encoder"):
        Transport([[ConceptEmbedding(CONCEPT)]], TransportMode.COSINE).gates(torch.zeros(1, 2, 3))


def test_latent_gate_ramps_the_cosine_of_prediction_shifts_and_keeps_the_closest_concept():
    empty = embedding([0, 0], [0, 0])
    transport = Transport([[ConceptEmbedding(CONCEPT), ConceptEmbedding(PROMPT_A)], [ConceptEmbedding(PROMPT_B)]],
                          TransportMode.LATENT, empty=empty, latent_threshold=0.2, latent_saturation=0.6)
    concept_shifts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # one shift per concept, in order
    prompt_shifts = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    gates = transport.latent_gates(prompt_shifts, concept_shifts)
    # prompt 0 points along concept 0 (membrane 0: gate 1) and against membrane 1's concept (cos -1: gate 0)
    assert gates[0].tolist() == [1.0, 0.0]
    # prompt 1 is at 45 degrees to concepts 0 and 1: cos 0.707 >= saturation -> 1; to membrane 1: -0.707 -> 0
    assert gates[1].tolist() == [1.0, 0.0]
    halfway = transport.latent_gates(torch.tensor([[0.4, math.sqrt(1 - 0.16)]]), torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.0, -1.0]]))
    assert halfway[0, 0].item() == pytest.approx(0.5, abs=1e-6), "cos 0.4 lies halfway between 0.2 and 0.6"
    assert transport.reads_model and not Transport([[ConceptEmbedding(CONCEPT)]], TransportMode.PAPER).reads_model


def test_minimum_gate_is_the_least_a_membrane_opens():
    transport = Transport([[ConceptEmbedding(CONCEPT)]], TransportMode.COSINE, floor=0.4)
    gates = transport.gates(torch.stack([PROMPT_B, PROMPT_A, PROMPT_C]))[:, 0]
    assert gates.tolist() == pytest.approx([0.4, 0.5, 1.0])
    with pytest.raises(SPMError, match="minimum gate"):
        Transport([[ConceptEmbedding(CONCEPT)]], TransportMode.COSINE, floor=1.5)
    with pytest.raises(SPMError, match="latent transport needs the empty prompt's embedding"):
        Transport([[ConceptEmbedding(CONCEPT)]], TransportMode.LATENT)


def test_look_ahead_steps_a_cfg_sampler_that_a_constant_prediction_makes_exact():
    """With a prediction that does not depend on the latent, Euler's steps are exact: the latent keeps the
    guided picture (uncond + cfg x (cond - uncond)) and its noise shrinks to the last sigma's share."""
    picture, unconditional = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    guided = unconditional + LATENT_LOOKAHEAD_CFG * (picture - unconditional)
    noise = torch.randn(1, 4, 8, 8)
    sigmas = [torch.tensor(14.6), torch.tensor(9.0), torch.tensor(6.1), torch.tensor(4.3), torch.tensor(3.1)]
    calls = []

    def denoise(x, sigma, conditional):
        calls.append((float(sigma), conditional))
        return picture if conditional else unconditional

    x = look_ahead(denoise, guided + sigmas[0] * noise, sigmas)
    assert torch.allclose(x, guided + sigmas[-1] * noise, atol=1e-4)
    assert sorted(calls) == sorted((float(s), c) for s in sigmas[:-1] for c in (True, False))
