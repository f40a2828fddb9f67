"""Our membrane on ComfyUI's UNet against a reference SPM written here from the method (docs/architecture.md) on a
diffusers UNet2DConditionModel with the same (converted) weights."""

import pytest
import torch
from membrane_helpers import key_map_of, modules_of, random_membrane, shapes_of
from tiny_models import build_patcher, model_config_for

from spm_core.membrane import GateLaw, official_merge
from spm_core.stack import InstalledHooks, MembraneStack, MembraneUse

TOLERANCE = 1e-5


def diffusers_twin(patcher):
    """A diffusers UNet with the ComfyUI model's weights, converted by ComfyUI's own key table."""
    import comfy.utils
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    comfy_weights = patcher.model.diffusion_model.state_dict()
    table = comfy.utils.unet_to_diffusers(model_config_for("sd1").unet_config)
    unet.load_state_dict({name: comfy_weights[table[name]] for name in unet.state_dict()})
    return unet.eval()


def reference_spm(unet, membranes, gates):
    """The method literally: every membrane adds gate · alpha/rank · up(down(x)) on each target
    layer, one branch per membrane. Returns the hook handles."""
    handles = []
    for membrane, gate in zip(membranes, gates):
        for name, layer in membrane.layers.items():
            path = name[len("lora_unet_"):]
            module = unet
            for part in path.replace("to_out_0", "to_out.0").replace("ff_net_0_proj", "ff.net.0.proj") \
                            .replace("ff_net_2", "ff.net.2").split("."):
                module = _descend(module, part)

            def hook(mod, inputs, output, layer=layer, gate=gate):
                x = inputs[0]
                if layer.conv:
                    branch = torch.nn.functional.conv2d(
                        torch.nn.functional.conv2d(x, layer.down[:, :, None, None]), layer.up[:, :, None, None])
                else:
                    branch = x @ layer.down.t() @ layer.up.t()
                return output + gate * layer.scale * branch

            handles.append(module.register_forward_hook(hook))
    return handles


def _descend(module, underscored):
    """Walk a diffusers module path whose dots became underscores (names contain no '_' ambiguity
    that matters once attribute names are tried greedily)."""
    parts = underscored.split("_")
    while parts:
        for take in range(len(parts), 0, -1):
            candidate = "_".join(parts[:take])
            if hasattr(module, candidate) or (candidate.isdigit() and isinstance(module, torch.nn.ModuleList)):
                module = module[int(candidate)] if candidate.isdigit() else getattr(module, candidate)
                parts = parts[take:]
                break
        else:
            raise AttributeError(f"cannot resolve {underscored}")
    return module


@pytest.fixture(scope="module")
def setup():
    patcher = build_patcher("sd1", seed=3)
    key_map = key_map_of(patcher)
    modules = modules_of(patcher, key_map)
    membranes = [random_membrane(key_map, modules, seed=s, target=f"concept{s}", std=0.2) for s in (10, 11, 12)]
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([400.0, 400.0]),
              torch.randn(2, 77, 32, generator=generator))
    return patcher, key_map, modules, membranes, inputs, diffusers_twin(patcher)


def comfy_eps(patcher, inputs):
    x, t, context = inputs
    return patcher.model.diffusion_model(x, t, context=context)


def diffusers_eps(unet, inputs):
    x, t, context = inputs
    return unet(x, t, encoder_hidden_states=context).sample


def reference_eps(unet, membranes, gates, inputs):
    """The diffusers UNet's prediction with the reference SPM hooks on, which are then taken off."""
    handles = reference_spm(unet, membranes, gates)
    try:
        return diffusers_eps(unet, inputs)
    finally:
        for handle in handles:
            handle.remove()


def run_with_membranes(patcher, key_map, modules, membranes, gates, law=GateLaw.LINEAR, inputs=None):
    stack = MembraneStack([MembraneUse(m) for m in membranes], key_map, shapes_of(modules), gate_law=law)
    hooks = InstalledHooks(stack)
    hooks.install(modules)
    try:
        with stack.gates_active(torch.tensor([gates] * inputs[0].shape[0])):
            return comfy_eps(patcher, inputs)
    finally:
        hooks.remove()


def test_bare_models_agree(setup):
    patcher, _, _, _, inputs, unet = setup
    assert (comfy_eps(patcher, inputs) - diffusers_eps(unet, inputs)).abs().max() <= TOLERANCE


@pytest.mark.parametrize("gate", [1.0, 0.37, 0.0])
def test_one_membrane_matches_reference(setup, gate):
    patcher, key_map, modules, membranes, inputs, unet = setup
    ours = run_with_membranes(patcher, key_map, modules, membranes[:1], [gate], inputs=inputs)
    reference = reference_eps(unet, membranes[:1], [gate], inputs)
    assert (ours - reference).abs().max() <= TOLERANCE
    if gate:
        assert (ours - comfy_eps(patcher, inputs)).abs().max() > 100 * TOLERANCE, "the membrane must change the output"


def test_three_membranes_equal_sum_of_branches_and_official_merge_does_not(setup):
    patcher, key_map, modules, membranes, inputs, unet = setup
    gates = [1.0, 0.6, 0.3]
    ours = run_with_membranes(patcher, key_map, modules, membranes, gates, inputs=inputs)
    reference = reference_eps(unet, membranes, gates, inputs)
    assert (ours - reference).abs().max() <= TOLERANCE

    # The official merge sums the ups and the downs of all membranes into ONE rank-1 adapter,
    # which adds cross-terms up_i · down_j. Compared at gate 1, where both gate laws agree.
    ones = [1.0, 1.0, 1.0]
    sum_of_branches = reference_eps(unet, membranes, ones, inputs)
    official = reference_eps(unet, [official_merge(membranes, ones)], [1.0], inputs)
    ours_at_one = run_with_membranes(patcher, key_map, modules, membranes, ones, inputs=inputs)
    assert (ours_at_one - sum_of_branches).abs().max() <= TOLERANCE
    effect = (sum_of_branches - diffusers_eps(unet, inputs)).norm()
    merge_error = ((official - sum_of_branches).norm() / effect).item()
    print(f"official merge of 3 membranes: error {merge_error:.2f}x the membranes' own effect")
    assert merge_error > 0.1


def test_paper_squared_law_scales_with_gate_squared(setup):
    patcher, key_map, modules, membranes, inputs, unet = setup
    squared = run_with_membranes(patcher, key_map, modules, membranes[:1], [0.5], law=GateLaw.PAPER_SQUARED, inputs=inputs)
    linear_quarter = run_with_membranes(patcher, key_map, modules, membranes[:1], [0.25], inputs=inputs)
    assert (squared - linear_quarter).abs().max() <= TOLERANCE


@pytest.mark.parametrize("count, gates", [(1, [0.6]), (3, [1.0, 0.6, 0.3])])
def test_official_merge_law_reproduces_the_official_code(setup, count, gates):
    """transport 'official_code': our hooks with GateLaw.OFFICIAL_MERGE against the reference with
    the official code's merged adapter (downs and ups scaled by their gates and summed)."""
    patcher, key_map, modules, membranes, inputs, unet = setup
    ours = run_with_membranes(patcher, key_map, modules, membranes[:count], gates, law=GateLaw.OFFICIAL_MERGE, inputs=inputs)
    official = reference_eps(unet, [official_merge(membranes[:count], gates)], [1.0], inputs)
    assert (ours - official).abs().max() <= TOLERANCE
    linear = run_with_membranes(patcher, key_map, modules, membranes[:count], gates, inputs=inputs)
    assert (ours - linear).abs().max() > 100 * TOLERANCE, "the official law differs from ours at these gates"


def test_spm_core_alone_applies_a_membrane_file_to_a_diffusers_unet(setup, tmp_path):
    """docs/architecture.md's ten lines: a membrane file on a diffusers UNet with spm_core only (no ComfyUI
    key map), equal to the reference at the same gate; nothing changes once the hooks are off."""
    from spm_core.file_format import load_membrane, save_membrane
    from spm_core.stack import apply_membranes

    _, _, _, membranes, inputs, unet = setup
    save_membrane(str(tmp_path / "concept.safetensors"), membranes[0])
    bare = diffusers_eps(unet, inputs)
    reference = reference_eps(unet, membranes[:1], [0.37], inputs)

    stack, hooks = apply_membranes(unet, [MembraneUse(load_membrane(str(tmp_path / "concept.safetensors")))])
    try:
        with stack.gates_active(torch.full((inputs[0].shape[0], 1), 0.37)):
            ours = diffusers_eps(unet, inputs)
        outside = diffusers_eps(unet, inputs)
    finally:
        hooks.remove()
    assert len(stack.layers) == len(membranes[0].layers)
    assert (ours - reference).abs().max() <= TOLERANCE
    assert torch.equal(outside, bare)
