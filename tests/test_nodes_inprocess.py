"""The nodes in-process on real ComfyUI sampling: per-row gates in a CFG batch, isolation of
branches without membranes, chaining, inspector and export, and hundreds of runs without leaks."""

import gc
import os
import resource

import pytest
import torch
from membrane_helpers import BROKEN_MEMBRANES, key_map_of, modules_of, random_membrane, write_broken_membranes
from pack import encode, load_spm, node, pack_module, sample
from tiny_models import build_patcher

from spm_core.file_format import save_membrane


class CallSpy:
    """A DIFFUSION_MODEL wrapper (under its own key) that records, per model call, the gate matrix the
    membrane stack sees, the chunk kinds, the output, and the same call's output with gates closed."""

    def __init__(self, stack):
        self.stack, self.calls = stack, []

    def __call__(self, executor, *args, **kwargs):
        gates = self.stack.current_row_gates()
        out = executor(*args, **kwargs)
        with self.stack.gates_active(torch.zeros(1, self.stack.membrane_count)):
            bare = executor(*args, **kwargs)
        options = kwargs.get("transformer_options") or args[5]
        self.calls.append({"gates": None if gates is None else gates.clone(), "kinds": list(options["cond_or_uncond"]),
                           "out": out.clone(), "bare": bare.clone()})
        return out


def test_cfg_batch_rows_are_gated_by_their_own_prompt(spm_world):
    from comfy.patcher_extension import WrappersMP

    import nodes

    patcher, clip, _ = spm_world
    model = load_spm(patcher, clip, "snoopy.safetensors", transport="calibrated")
    state = model.get_attachment(pack_module("nodes.runtime").KEY)
    spy = CallSpy(state.stack)
    model = model.clone()
    model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test_spy", spy)
    related, unrelated = encode(clip, "snoopy"), encode(clip, "a bowl of fruit on a table")
    (positive,) = nodes.ConditioningCombine().combine(related, unrelated)
    negative = encode(clip, "")
    sample(model, positive, negative, batch=1)

    assert spy.calls, "the sampler never called the model"
    for call in spy.calls:
        gates, kinds = call["gates"], call["kinds"]
        assert sorted(kinds) == [0, 0, 1], "2 prompts x cond + 1 uncond chunk in one batch"
        per_chunk = gates.shape[0] // len(kinds)
        chunk_gates = [gates[i * per_chunk, 0].item() for i in range(len(kinds))]
        # the related prompt is token-identical to the concept -> 1; the unrelated one -> 0;
        # the negative rows are closed ("positive only")
        assert sorted(chunk_gates) == [0.0, 0.0, 1.0]
        for chunk, gate in enumerate(chunk_gates):
            rows = slice(chunk * per_chunk, (chunk + 1) * per_chunk)
            if gate == 0.0:
                assert torch.equal(call["out"][rows], call["bare"][rows]), "a closed row must equal the bare model exactly"
            else:
                assert not torch.equal(call["out"][rows], call["bare"][rows])


def test_branch_without_membranes_is_bit_identical_to_pack_absent(spm_world):
    patcher, clip, _ = spm_world
    positive, negative = encode(clip, "snoopy"), encode(clip, "")
    reference = sample(patcher, positive, negative)  # the pack loaded, no membrane anywhere yet
    with_membrane = load_spm(patcher, clip, "snoopy.safetensors", transport="always_open")
    erased = sample(with_membrane, positive, negative)
    after = sample(patcher, positive, negative)
    erased_again = sample(with_membrane, positive, negative)
    assert not torch.equal(erased, reference)
    assert torch.equal(after, reference)
    assert torch.equal(erased_again, erased)


def test_upstream_model_is_never_changed_and_chains_fuse(spm_world):
    patcher, clip, _ = spm_world
    runtime = pack_module("nodes.runtime")
    before = (dict(patcher.attachments), {k: dict(v) for k, v in patcher.wrappers.items()}, dict(patcher.injections))
    one = load_spm(patcher, clip, "snoopy.safetensors")
    two = load_spm(one, clip, "mickey_mouse.safetensors")
    three = load_spm(two, clip, "van_gogh.safetensors")
    assert (dict(patcher.attachments), {k: dict(v) for k, v in patcher.wrappers.items()}, dict(patcher.injections)) == before
    assert len(one.get_attachment(runtime.KEY).entries) == 1
    state = three.get_attachment(runtime.KEY)
    assert [e.membrane.name for e in state.entries] == ["snoopy", "mickey_mouse", "van_gogh"]
    assert all(layer.down.shape[0] == 3 for layer in state.stack.layers.values()), "one fused stack of rank 3 per layer"
    assert len(three.wrappers["apply_model"][runtime.KEY]) == 1, "chaining must not stack wrappers"


def test_bad_inputs_give_clear_errors_and_leave_the_model_untouched(spm_world):
    patcher, clip, folder = spm_world
    errors = pack_module("spm_core.errors")
    write_broken_membranes(str(folder))
    wide = build_patcher("sd2", seed=1, context=48)  # another architecture: 48-wide cross-attention
    wide_map = key_map_of(wide)
    save_membrane(str(folder / "other_arch.safetensors"), random_membrane(wide_map, modules_of(wide, wide_map), seed=4))
    before = (dict(patcher.attachments), {k: dict(v) for k, v in patcher.wrappers.items()}, dict(patcher.injections))
    cases = [(dict(membrane=name, transport="paper"), errors.SPMError, phrase) for name, phrase in BROKEN_MEMBRANES.items()]
    cases += [
        (dict(membrane="other_arch.safetensors"), errors.SPMModelMismatch, "does not fit"),
        (dict(membrane="snoopy.safetensors", strength=float("nan")), errors.SPMError, "strength is nan"),
        (dict(membrane="snoopy.safetensors", start=0.8, end=0.2), errors.SPMError, "sampling range"),
        (dict(membrane="snoopy.safetensors", transport="fuzzy"), errors.SPMError, "unknown transport mode"),
        (dict(membrane="snoopy.safetensors", rows="sideways"), errors.SPMError, "unknown rows 'sideways'; choose one of"),
        (dict(membrane="snoopy.safetensors", min_gate=1.5), errors.SPMError, "minimum gate must lie in [0, 1]"),
        (dict(membrane="snoopy.safetensors", negative_strength=float("inf")), errors.SPMError, "negative_strength is inf"),
        (dict(membrane="snoopy.safetensors", strength=1e9), errors.SPMError, "strength is 1000000000.0; give a number"),
        (dict(membrane="snoopy.safetensors", ramp="zigzag"), errors.SPMError, "unknown ramp 'zigzag'; choose one of"),
        (dict(membrane="snoopy.safetensors", transport="official_code", ramp="fade in"), errors.SPMError,
         "set ramp to 'constant'"),
        (dict(membrane="snoopy.safetensors", clip=None), errors.SPMError, "needs the clip input"),
    ]
    for kwargs, error_type, phrase in cases:
        with pytest.raises(error_type) as caught:
            load_spm(patcher, kwargs.get("clip", clip), **{k: v for k, v in kwargs.items() if k != "clip"})
        assert phrase in str(caught.value), str(caught.value)
        if kwargs["membrane"] in BROKEN_MEMBRANES or error_type is not errors.SPMError:  # a bad file is named
            assert kwargs["membrane"] in str(caught.value), str(caught.value)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_spm(patcher, clip, "missing.safetensors")
    assert (dict(patcher.attachments), {k: dict(v) for k, v in patcher.wrappers.items()}, dict(patcher.injections)) == before


def test_inspector_reports_gates_per_membrane_and_prompt(spm_world):
    patcher, clip, _ = spm_world
    model = load_spm(load_spm(patcher, clip, "snoopy.safetensors"), clip, "van_gogh.safetensors", transport="always_open")
    result = node("SPMTransportInspector").execute(model, encode(clip, "snoopy"), encode(clip, "a bowl of fruit on a table"))
    text, image = result.result
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["membrane", "transport"]
    snoopy_row = next(line for line in lines if line.startswith("snoopy"))
    van_gogh_row = next(line for line in lines if line.startswith("van_gogh"))
    assert snoopy_row.split()[-2:] == ["1.000", "0.000"]
    assert van_gogh_row.split()[-2:] == ["1.000", "1.000"]
    assert image.ndim == 4 and image.shape[-1] == 3 and image.min() < 0.5 < image.max()


def test_merge_into_model_equals_always_open_membranes(spm_world):
    patcher, clip, _ = spm_world
    positive, negative = encode(clip, "a bowl of fruit on a table"), encode(clip, "")
    gated = load_spm(load_spm(patcher, clip, "snoopy.safetensors", transport="always_open", strength=0.8),
                     clip, "mickey_mouse.safetensors", transport="always_open", rows="positive and negative")
    open_rows = sample(gated, positive, negative)
    positive_only = load_spm(patcher, clip, "snoopy.safetensors", transport="always_open", strength=0.8)
    merged = node("SPMMergeIntoModel").execute(gated).result[0]
    assert merged.get_attachment(pack_module("nodes.runtime").KEY) is None
    static = sample(merged, positive, negative)
    assert not torch.equal(static, sample(patcher, positive, negative))
    assert not torch.equal(sample(positive_only, positive, negative), static)
    # snoopy is positive-only in the gated model but merged everywhere: compare a model that
    # opens both membranes on all rows
    everywhere = load_spm(load_spm(patcher, clip, "snoopy.safetensors", transport="always_open", strength=0.8,
                                   rows="positive and negative", negative_strength=0.8),
                          clip, "mickey_mouse.safetensors", transport="always_open", rows="positive and negative")
    # weight patching and the hook path round differently in fp32: compare relative to the latent scale
    assert (sample(everywhere, positive, negative) - static).abs().max() <= 1e-5 * static.abs().max()
    assert not torch.equal(open_rows, static)


def test_save_as_lora_is_read_by_the_stock_loader(spm_world, caplog):
    import comfy.lora
    import comfy.utils
    import folder_paths

    patcher, clip, folder = spm_world
    folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    model = load_spm(load_spm(patcher, clip, "snoopy.safetensors"), clip, "van_gogh.safetensors", strength=0.5)
    path = node("SPMSaveAsLoRA").execute(model, "baked_pair").result[0]
    assert os.path.dirname(path) == str(folder)
    lora = comfy.utils.load_torch_file(path, safe_load=True)
    with caplog.at_level("WARNING"):
        patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(patcher.model, {}))
    assert "not loaded" not in caplog.text
    assert len(patches) == len(model.get_attachment(pack_module("nodes.runtime").KEY).stack.layers)


def test_two_hundred_runs_leave_no_hooks_and_no_memory_growth(spm_world):
    import comfy.model_management as mm

    patcher, clip, _ = spm_world
    model = load_spm(load_spm(patcher, clip, "snoopy.safetensors"), clip, "mickey_mouse.safetensors")
    positive, negative = encode(clip, "snoopy"), encode(clip, "")
    modules = list(patcher.model.diffusion_model.modules())

    def hook_count():
        return sum(len(m._forward_hooks) for m in modules)

    for run in range(200):
        if run == 20:
            gc.collect()
            rss_after_warmup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            hooks_after_warmup = hook_count()
        sample(model, positive, negative, seed=run, steps=1)
    gc.collect()
    rss_growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_after_warmup
    print(f"200 runs: hooks {hooks_after_warmup} -> {hook_count()}, peak RSS growth after warm-up {rss_growth_kib} KiB")
    assert hook_count() == hooks_after_warmup <= len(model.get_attachment(pack_module("nodes.runtime").KEY).stack.layers)
    assert rss_growth_kib < 50 * 1024
    mm.unload_all_models()
    assert hook_count() == 0, "unloading the model must remove every membrane hook"


def test_sampling_range_switches_the_membrane_on_and_off(spm_world):
    patcher, clip, _ = spm_world
    positive, negative = encode(clip, "snoopy"), encode(clip, "")
    bare = sample(patcher, positive, negative)

    def with_range(start, end):
        return sample(load_spm(patcher, clip, "snoopy.safetensors", transport="always_open", start=start, end=end),
                      positive, negative)

    never = with_range(1.0, 1.0)  # sigma at 100% is 0: no sampling step falls in the range
    whole, second_half = with_range(0.0, 1.0), with_range(0.5, 1.0)
    assert torch.equal(never, bare)
    assert not torch.equal(whole, bare) and not torch.equal(second_half, bare) and not torch.equal(second_half, whole)


@pytest.mark.parametrize("folder", ["ComfyUI-SPM", "comfyui-spm", "comfyui_spm"])
def test_membranes_gate_whatever_the_pack_folder_is_named_beside_a_scripts_own_spm_core(folder, tmp_path):
    """ComfyUI imports spm_core as `<pack folder>.spm_core`, a script as `spm_core`: two copies in one
    process (a second copy once silently did nothing: its hooks never saw the other's gates). Under
    each name the pack's folder gets (a git clone, the registry, this test suite), a membrane applied
    through SPM Load Membrane gates every row as it should (tests/pack_folder_check.py, in a fresh
    process so that ComfyUI loads the pack once)."""
    import subprocess
    import sys

    from conftest import COMFYUI_ROOT

    check = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pack_folder_check.py")
    result = subprocess.run([sys.executable, check, folder, str(tmp_path)], env={**os.environ, "COMFYUI_ROOT": COMFYUI_ROOT},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def test_unfinished_training_files_are_not_offered_as_membranes(spm_world):
    _, _, folder = spm_world
    paths = pack_module("nodes.paths")
    (folder / "snoopy_retrain.partial.safetensors").write_bytes((folder / "snoopy.safetensors").read_bytes())
    try:
        choices = paths.membrane_choices()
    finally:
        (folder / "snoopy_retrain.partial.safetensors").unlink()
    assert "snoopy.safetensors" in choices
    assert not any(name.endswith(".partial.safetensors") for name in choices), choices


def test_lora_folder_listing_follows_changed_files(spm_world, tmp_path):
    """The SPM tags of models/loras files are cached by size and modification time: a LoRA that
    becomes a membrane (or stops being one) is listed (or dropped) on the next refresh."""
    import folder_paths
    from safetensors.torch import save_file

    _, _, folder = spm_world
    paths = pack_module("nodes.paths")
    folder_paths.add_model_folder_path("loras", str(tmp_path), is_default=True)
    lora = tmp_path / "style.safetensors"
    weights = {"lora_unet_x.lora_down.weight": torch.zeros(1, 4)}
    save_file(weights, str(lora), metadata={"ss_network_module": "networks.lora"})
    assert "loras/style.safetensors" not in paths.membrane_choices()
    lora.write_bytes((folder / "snoopy.safetensors").read_bytes())
    assert "loras/style.safetensors" in paths.membrane_choices()
    save_file(weights, str(lora), metadata={"ss_network_module": "networks.lora"})
    assert "loras/style.safetensors" not in paths.membrane_choices()


def test_clip_is_needed_only_by_transports_that_compare_prompts(spm_world):
    patcher, clip, _ = spm_world
    positive, negative = encode(clip, "snoopy"), encode(clip, "")
    with_clip = sample(load_spm(patcher, clip, "snoopy.safetensors", transport="always_open"), positive, negative)
    without_clip = sample(load_spm(patcher, None, "snoopy.safetensors", transport="always_open"), positive, negative)
    assert torch.equal(with_clip, without_clip)
    errors = pack_module("spm_core.errors")
    with pytest.raises(errors.SPMError, match="snoopy.safetensors: transport 'paper' .* needs the clip input"):
        load_spm(patcher, None, "snoopy.safetensors", transport="paper")


def test_inspector_shows_the_latent_gate_sampling_measures(spm_world):
    """A conditioning whose token rows are reversed draws exactly what the original draws (the UNet's
    cross-attention does not see token order), while its text gate stays low. Given the sampler's
    latent and seed, the Inspector shows the gate the sampler's first step then uses; without them it
    says it shows the text gate only."""
    from comfy.patcher_extension import WrappersMP
    from test_guider_roles import RowSpy

    import nodes

    patcher, clip, _ = spm_world
    model = load_spm(patcher, clip, "snoopy.safetensors", transport="latent")
    (snoopy,) = nodes.CLIPTextEncode().encode(clip, "snoopy")
    reversed_rows = [[snoopy[0][0].flip(1), {}]]
    (latent,) = nodes.EmptyLatentImage().generate(64, 64, 1)
    inspector = node("SPMTransportInspector")
    text_only = inspector.execute(model, reversed_rows).result[0].splitlines()[-1]
    measured = inspector.execute(model, reversed_rows, None, latent, 3).result[0].splitlines()[-1]
    assert "text gate only: connect the latent" in text_only and float(text_only.split()[-1]) < 0.5

    spy = RowSpy(model.get_attachment(pack_module("nodes.runtime").KEY).stack)
    spied = model.clone()
    spied.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "row_spy", spy)
    nodes.KSampler().sample(spied, 3, 2, 6.0, "euler", "normal", reversed_rows, encode(clip, "a bowl of fruit"), latent)
    gates, context = spy.calls[0]
    row = next(r for r in range(context.shape[0]) if torch.equal(context[r], reversed_rows[0][0][0]))
    assert float(measured.split()[-1]) == pytest.approx(gates[row, 0].item(), abs=1e-3) == 1.0
