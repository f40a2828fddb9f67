"""The membrane next to other things that patch a ComfyUI model: LoraLoader, other packs' wrappers,
the lowvram loading path, fp16/bf16 weights."""

import pytest
import torch
from membrane_helpers import key_map_of, modules_of, random_membrane, shapes_of
from pack import encode, load_pack, load_spm, sample
from tiny_models import build_patcher

from spm_core.stack import InstalledHooks, MembraneStack, MembraneUse


def random_lora(patcher, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for name, key in key_map_of(patcher).items():
        if name.endswith(("attn2_to_k", "attn2_to_v", "ff_net_2")):
            out_features, in_features = patcher.model.get_submodule(key).weight.shape[:2]
            lora[name + ".lora_up.weight"] = torch.randn(out_features, 4, generator=generator) * 0.2
            lora[name + ".lora_down.weight"] = torch.randn(4, in_features, generator=generator) * 0.2
            lora[name + ".alpha"] = torch.tensor(4.0)
    return lora


def test_membrane_and_lora_loader_compose_in_either_order(spm_world):
    import comfy.sd

    patcher, clip, _ = spm_world
    lora = random_lora(patcher)
    positive, negative = encode(clip, "snoopy"), encode(clip, "")

    def with_lora(model):
        return comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 0.0)[0]

    lora_then_spm = sample(load_spm(with_lora(patcher), clip, "snoopy.safetensors", transport="always_open"), positive, negative)
    spm_then_lora = sample(with_lora(load_spm(patcher, clip, "snoopy.safetensors", transport="always_open")), positive, negative)
    lora_only = sample(with_lora(patcher), positive, negative)
    spm_only = sample(load_spm(patcher, clip, "snoopy.safetensors", transport="always_open"), positive, negative)
    assert (lora_then_spm - spm_then_lora).abs().max() <= 1e-4
    assert (lora_then_spm - lora_only).abs().max() > 1e-2
    assert (lora_then_spm - spm_only).abs().max() > 1e-2


def test_other_packs_wrappers_keep_working(spm_world):
    from comfy.patcher_extension import WrappersMP

    patcher, clip, _ = spm_world
    positive, negative = encode(clip, "snoopy"), encode(clip, "")
    calls = []

    def other_pack(executor, *args, **kwargs):
        calls.append(1)
        return executor(*args, **kwargs) * 0.5

    def add_other(model):
        model = model.clone()
        model.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "other_pack", other_pack)
        return model

    other_then_spm = sample(load_spm(add_other(patcher), clip, "snoopy.safetensors", transport="always_open"), positive, negative)
    assert calls, "the other pack's wrapper was dropped"
    spm_then_other = sample(add_other(load_spm(patcher, clip, "snoopy.safetensors", transport="always_open")), positive, negative)
    spm_alone = sample(load_spm(patcher, clip, "snoopy.safetensors", transport="always_open"), positive, negative)
    assert torch.equal(other_then_spm, spm_then_other)
    assert (other_then_spm - spm_alone).abs().max() > 1e-2


def eps(patcher, x, context):
    return patcher.model.diffusion_model(x, torch.full((x.shape[0],), 300.0), context=context.to(x.dtype))


def hooked_eps(patcher, stack, x, context, gate):
    hooks = InstalledHooks(stack)
    key_map = key_map_of(patcher)
    hooks.install(modules_of(patcher, key_map))
    try:
        with stack.gates_active(torch.full((x.shape[0], 1), gate)):
            return eps(patcher, x, context)
    finally:
        hooks.remove()


@pytest.fixture(scope="module")
def tiny():
    load_pack()
    patcher = build_patcher("sd1", seed=21)
    key_map = key_map_of(patcher)
    modules = modules_of(patcher, key_map)
    stack = MembraneStack([MembraneUse(random_membrane(key_map, modules, seed=5, std=0.2))], key_map, shapes_of(modules))
    generator = torch.Generator().manual_seed(2)
    return patcher, stack, torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)


def test_lowvram_loading_path(tiny):
    """ComfyUI's lowvram path casts weights per forward (comfy_cast_weights); hooks still apply."""
    patcher, stack, x, context = tiny
    full = hooked_eps(patcher, stack, x, context, 1.0)
    lowvram = patcher.clone()
    lowvram.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)
    try:
        cast_modules = [m for m in lowvram.model.modules() if getattr(m, "comfy_cast_weights", False)]
        assert cast_modules, "the lowvram path was not taken"
        streamed = hooked_eps(lowvram, stack, x, context, 1.0)
        assert torch.equal(eps(lowvram, x, context), eps(patcher, x, context))
    finally:
        lowvram.unpatch_model()
    assert (streamed - full).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(tiny, dtype):
    patcher, stack, x, context = tiny
    reference = hooked_eps(patcher, stack, x, context, 1.0)
    half = build_patcher("sd1", seed=21)
    half.model.diffusion_model.to(dtype)
    bare = eps(half, x.to(dtype), context)
    assert torch.equal(hooked_eps(half, stack, x.to(dtype), context, 0.0), bare), "gate 0 must be bit-identical in half precision too"
    opened = hooked_eps(half, stack, x.to(dtype), context, 1.0)
    assert opened.dtype == dtype
    effect = (reference - eps(patcher, x, context)).abs().max()
    assert (opened.float() - reference).abs().max() < 0.1 * effect


def test_membrane_gates_the_rows_of_conds_that_carry_hooks(spm_world):
    """ComfyUI's hooks (a LoRA on the positive cond only, as the Create Hook LoRA and Cond Set Props
    nodes make): the step runs one model call per hook group with the hook's weights patched in, and
    every row still gets its own cond's gate."""
    import comfy.hooks
    from test_batch_layouts import gates_by_row
    from test_guider_roles import run_guider, spied_model

    patcher, clip, _ = spm_world
    positive, negative = encode(clip, "snoopy"), encode(clip, "a bowl of fruit")
    hooked = comfy.hooks.set_hooks_for_conditioning(positive, comfy.hooks.create_hook_lora(random_lora(patcher), 1.0, 1.0))
    outputs = {}
    for name, conditioning in (("plain", positive), ("hooked", hooked)):
        model, spy = spied_model(spm_world, "positive only")
        run_guider("KSampler", model, {"positive": conditioning, "negative": negative})
        assert gates_by_row(spy, {"snoopy": positive[0][0][0], "fruit": negative[0][0][0]}) == {"snoopy": {1.0}, "fruit": {0.0}}
        outputs[name] = [context.shape[0] for _, context in spy.calls]
    assert outputs["plain"][0] == 4 and outputs["hooked"][0] == 2, "the hook group did not get calls of its own"
