"""The token gate's arithmetic (spm_core.token_gate) on hand-made token vectors: the in-order
window match and the case variants a concept is matched in. On real T5 tokenizers and the tiny
Flux and Chroma: tests/test_flux.py."""

import torch

from spm_core.token_gate import TokenBank, case_variants


def test_token_bank_matches_the_concept_in_order_anywhere_in_the_row():
    generator = torch.Generator().manual_seed(0)
    words = torch.randn(6, 16, generator=generator)  # a vocabulary of six random token vectors
    bank = TokenBank([words[[0, 1, 2]], words[[3]]], empty=words[[5, 5, 5, 5]])
    rows = torch.stack([words[[4, 0, 1, 2, 5, 5]],   # concept 0 in order, mid-row
                        words[[2, 1, 0, 4, 5, 5]],   # its tokens reversed
                        words[[5, 5, 5, 5, 0, 1]],   # its first two tokens at the very end: no whole window
                        words[[4, 4, 4, 4, 4, 3]]])  # concept 1 last
    match = bank.match(rows)
    assert torch.allclose(match[0, 0], torch.tensor(1.0)) and torch.allclose(match[3, 1], torch.tensor(1.0))
    # reversed: only the middle token lines up (0.36); a window running past the row's end would
    # score 2 of 3 tokens (0.67), a whole window inside it scores 0.03
    assert match[1, 0] < 0.5 and match[2, 0] < 0.5, "in order, and the whole concept within the row"
    assert torch.equal(bank.relative(words[[5, 5, 5, 5]][None]), torch.zeros(1, 2)), "the empty prompt is 0"


def test_case_variants():
    assert case_variants("van gogh") == ["van gogh", "Van Gogh", "VAN GOGH"]
    assert case_variants("Snoopy's house") == ["Snoopy's house", "snoopy's house", "Snoopy's House", "SNOOPY'S HOUSE"]
