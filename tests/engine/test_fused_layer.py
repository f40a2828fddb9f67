"""The fused layer's in-place accumulation (the hooks' fast path) agrees with its out-of-place
(autograd) form and leaves rows outside the open range untouched."""

import pytest
import torch

from spm_core.membrane import FusedLayer, LayerWeights


@pytest.mark.parametrize("conv", [False, True])
def test_in_place_accumulation_matches_the_autograd_form(conv):
    generator = torch.Generator().manual_seed(0)
    parts = [(i, LayerWeights(torch.randn(rank, 6, generator=generator), torch.randn(5, rank, generator=generator), 1.0, conv))
             for i, rank in enumerate((1, 2))]
    layer = FusedLayer(parts)
    x = torch.randn(3, 6, 4, 4, generator=generator) if conv else torch.randn(3, 7, 6, generator=generator)
    output = torch.randn(3, 5, 4, 4, generator=generator) if conv else torch.randn(3, 7, 5, generator=generator)
    gates = torch.tensor([[0.0, 0.0], [0.3, 1.0], [0.9, 0.0]])
    expected = output + layer.delta(x, gates)

    in_place = output.clone()
    assert layer.add_to(in_place, x, gates, slice(1, 3)) is in_place
    assert torch.equal(in_place[0], output[0]), "a closed row outside the open range must stay untouched"
    assert (in_place - expected).abs().max() <= 1e-5

    with torch.enable_grad():
        tracked_x = x.clone().requires_grad_()
        kept = output.clone()
        result = layer.add_to(kept, tracked_x, gates)
        assert torch.equal(kept, output), "autograd needs the original output: no in-place update"
        result.sum().backward()
    assert (result.detach() - expected).abs().max() <= 1e-5
    assert tracked_x.grad is not None and tracked_x.grad.abs().sum() > 0
