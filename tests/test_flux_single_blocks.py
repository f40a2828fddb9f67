"""Membranes on Flux's single blocks (issue 17): one Linear (linear1, linear2) runs over the text tokens
and then the image tokens, and a membrane adapts it on the text tokens only, counted from the last
double block's text output. Tiny Flux and Chroma from ComfyUI's own classes (tests/tiny_models.py).

What is checked: gate 1 equals a reference written here (the branch added to the first `context
tokens` rows of every single-block Linear) and differs from the same branch on every token; gate 0
and closed rows are the bare model bit for bit; image tokens never change inside a single block, in
sampling and in training; SPM Load Membrane with the token gate samples an unrelated prompt exactly as
the bare model; our file says in its metadata that it adapts single blocks on text tokens, and the same
tensors without that word are refused; baking such a membrane into a LoRA or the weights is refused;
training adapts single blocks unless switched off."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from membrane_helpers import modules_of, random_membrane
from pack import load_spm, node, pack_module
from test_flux import encode, flux_inputs, ksample
from test_training import train
from tiny_models import build_chroma_patcher, build_flux_clip, build_flux_patcher

from spm_core.errors import SPMError, SPMModelMismatch
from spm_core.file_format import is_text_token_layer, load_membrane, lora_tensors, save_membrane
from spm_core.membrane import GateLaw
from spm_core.stack import InstalledHooks, MembraneStack, MembraneUse

TEXT_TOKENS = 40  # the context length of flux_inputs here


def single_block_world(patcher) -> dict:
    """The model's single-block layers, and a random membrane on them only."""
    key_map, _ = pack_module("nodes.architectures").membrane_layers(patcher)
    key_map = {name: key for name, key in key_map.items() if is_text_token_layer(name)}
    modules = modules_of(patcher, key_map)
    membrane = dataclasses.replace(random_membrane(key_map, modules, seed=5, target="snoopy", std=0.3), architecture="flux")
    return {"patcher": patcher, "key_map": key_map, "modules": modules, "membrane": membrane}


@pytest.fixture(scope="module", params=["flux", "chroma"])
def world(request):
    pack_module("nodes")
    patcher = build_flux_patcher(seed=3) if request.param == "flux" else build_chroma_patcher(seed=6)
    return {**single_block_world(patcher), "family": request.param}


@pytest.fixture(autouse=True)
def _models_unloaded():
    import comfy.model_management

    comfy.model_management.unload_all_models()


def inputs_for(world, batch: int = 2) -> dict:
    inputs = flux_inputs(batch=batch, tokens=TEXT_TOKENS)
    return inputs if world["family"] == "flux" else {k: v for k, v in inputs.items() if k != "y"}


def predict(world, inputs) -> torch.Tensor:
    return world["patcher"].model.diffusion_model(**inputs)


def hooked(world, gates, inputs, gate_law: GateLaw = GateLaw.LINEAR) -> torch.Tensor:
    shapes = {key: (m.weight.shape[0], m.weight.shape[1], False) for key, m in world["modules"].items()}
    stack = MembraneStack([MembraneUse(world["membrane"])], world["key_map"], shapes, gate_law)
    hooks = InstalledHooks(stack)
    hooks.install(world["modules"], pack_module("nodes.architectures").text_stream_blocks(world["patcher"].model))
    try:
        with stack.gates_active(torch.as_tensor(gates, dtype=torch.float32)):
            return predict(world, inputs)
    finally:
        hooks.remove()


def reference(world, inputs, tokens: int | None) -> torch.Tensor:
    """The membrane at gate 1 by hand: `alpha/rank · up(down(x))` added to the first `tokens` rows of
    every adapted Linear's output (None: to every row, as a plain LoRA would)."""
    def hook_for(name):
        layer = world["membrane"].layers[name]

        def hook(module, args, output):
            x = args[0] if tokens is None else args[0][:, :tokens]
            branch = layer.scale * (x @ layer.down.t() @ layer.up.t())
            if tokens is None:
                return output + branch
            return torch.cat([output[:, :tokens] + branch, output[:, tokens:]], dim=1)
        return hook

    handles = [world["modules"][key].register_forward_hook(hook_for(name)) for name, key in world["key_map"].items()]
    try:
        return predict(world, inputs)
    finally:
        for handle in handles:
            handle.remove()


def test_single_blocks_read_the_text_tokens_first_then_the_image_tokens(world):
    """Measured: each single-block Linear sees (batch, text tokens + image tokens, in)."""
    seen = []
    handles = [m.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1])) for m in world["modules"].values()]
    try:
        predict(world, inputs_for(world))
    finally:
        for handle in handles:
            handle.remove()
    image_tokens = (8 // 2) * (8 // 2)  # an 8x8 latent in 2x2 patches
    assert seen and set(seen) == {TEXT_TOKENS + image_tokens}


def test_gate_one_adds_the_membrane_to_the_text_tokens_only(world):
    inputs = inputs_for(world)
    ours = hooked(world, [[1.0], [1.0]], inputs)
    masked, everywhere = reference(world, inputs, TEXT_TOKENS), reference(world, inputs, None)
    assert (ours - masked).abs().max() <= 1e-5 * masked.abs().max()
    assert (masked - everywhere).abs().max() > 1e-3, "the mask matters: on every token the prediction differs"
    assert (ours - predict(world, inputs)).abs().max() > 1e-3


def test_gate_zero_and_closed_rows_are_the_bare_model_bit_for_bit(world):
    inputs = inputs_for(world, batch=3)
    bare = predict(world, inputs)
    assert torch.equal(hooked(world, [[0.0]] * 3, inputs), bare)
    mixed = hooked(world, [[1.0], [0.0], [0.5]], inputs)
    assert torch.equal(mixed[1], bare[1])
    alone = hooked(world, [[0.5]] * 3, inputs)
    assert (mixed[2] - alone[2]).abs().max() <= 1e-5 * alone.abs().max()


def test_image_tokens_never_change_inside_a_single_block(world):
    """Each single-block Linear's image-token outputs with the membrane open equal the bare Linear on
    the same input (what reaches the block may differ: the text tokens it attends to changed)."""
    checked = []

    def watch(module, args, output):
        bare = torch.nn.functional.linear(args[0], module.weight, module.bias)
        checked.append(torch.equal(output[:, TEXT_TOKENS:], bare[:, TEXT_TOKENS:])
                       and not torch.equal(output[:, :TEXT_TOKENS], bare[:, :TEXT_TOKENS]))

    shapes = {key: (m.weight.shape[0], m.weight.shape[1], False) for key, m in world["modules"].items()}
    stack = MembraneStack([MembraneUse(world["membrane"])], world["key_map"], shapes)
    hooks = InstalledHooks(stack)
    hooks.install(world["modules"], pack_module("nodes.architectures").text_stream_blocks(world["patcher"].model))
    watchers = [m.register_forward_hook(watch) for m in world["modules"].values()]  # after ours: sees our output
    try:
        with stack.gates_active(torch.ones(2, 1)):
            predict(world, inputs_for(world))
    finally:
        hooks.remove()
        for watcher in watchers:
            watcher.remove()
    assert len(checked) == len(world["modules"]) and all(checked)


def test_training_hooks_leave_the_image_tokens_alone(world):
    core = pack_module("spm_core.training")
    membrane = core.TrainableMembrane.for_modules(
        {name: world["modules"][key] for name, key in world["key_map"].items()}, rank=1, alpha=1.0, seed=0)
    with torch.no_grad():
        for up in membrane.up:
            up.normal_(0, 0.3)
    outputs = {}
    membrane.attach({name: world["modules"][key] for name, key in world["key_map"].items()},
                    pack_module("nodes.architectures").text_stream_blocks(world["patcher"].model))
    watchers = [m.register_forward_hook(lambda m, a, out, key=key: outputs.setdefault(key, []).append(out.clone()))
                for key, m in world["modules"].items()]  # after the membrane's: they see its output
    try:
        for enabled in (False, True):
            membrane.enabled = enabled
            with torch.no_grad():
                predict(world, inputs_for(world))
    finally:
        membrane.detach()
        for watcher in watchers:
            watcher.remove()
    first = next(iter(outputs.values()))
    off, on = first  # the first single block's input is the same with and without the membrane
    assert torch.equal(off[:, TEXT_TOKENS:], on[:, TEXT_TOKENS:])
    assert not torch.equal(off[:, :TEXT_TOKENS], on[:, :TEXT_TOKENS])


def test_a_membrane_on_text_tokens_needs_the_text_stream():
    patcher = build_flux_patcher(seed=3)
    world = single_block_world(patcher)
    shapes = {key: (m.weight.shape[0], m.weight.shape[1], False) for key, m in world["modules"].items()}
    with pytest.raises(SPMModelMismatch, match="no text stream to count them from"):
        InstalledHooks(MembraneStack([MembraneUse(world["membrane"])], world["key_map"], shapes)).install(world["modules"])
    with pytest.raises(SPMError, match="official code's merge has no form for layers that act on text tokens only"):
        MembraneStack([MembraneUse(world["membrane"])], world["key_map"], shapes, GateLaw.OFFICIAL_MERGE)
    stack = MembraneStack([MembraneUse(world["membrane"])], world["key_map"], shapes)
    weights = {key: m.weight for key, m in world["modules"].items()}
    with pytest.raises(SPMError, match="acts on the text tokens only, which no weight can express"):
        stack.folded_weights(weights, torch.ones(1))


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    """models/spm and models/loras holding the single-block membrane and a plain copy of its tensors."""
    import folder_paths

    pack_module("nodes")
    world = single_block_world(build_flux_patcher(seed=3))
    folder = tmp_path_factory.mktemp("single_blocks")
    for kind in ("spm", "loras"):
        folder_paths.add_model_folder_path(kind, str(folder), is_default=True)
    save_membrane(str(folder / "single_snoopy.safetensors"), world["membrane"])
    yield {**world, "folder": folder, "clip": build_flux_clip(seed=4)}
    for kind in ("spm", "loras"):
        folder_paths.folder_names_and_paths[kind][0].remove(str(folder))


def test_our_file_says_it_adapts_single_blocks_on_text_tokens_and_a_plain_one_is_refused(flux_folder, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = flux_folder["folder"] / "single_snoopy.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["single_blocks"] == "text_tokens"
    loaded = load_membrane(str(path))
    assert loaded.architecture == "flux" and set(loaded.layers) == set(flux_folder["key_map"])
    plain = tmp_path / "plain.safetensors"
    save_file(lora_tensors(flux_folder["membrane"]), str(plain), metadata={"prompts": "snoopy"})
    with pytest.raises(pack_module("spm_core.errors").SPMFileError,
                       match=r"plain.safetensors: not an SPM membrane: .*single blocks .* on every token"):
        pack_module("spm_core.file_format").load_membrane(str(plain))


def test_the_token_gate_samples_an_unrelated_prompt_exactly_as_the_bare_model(flux_folder):
    patcher, clip = flux_folder["patcher"], flux_folder["clip"]
    model = load_spm(patcher, clip, "single_snoopy.safetensors", transport="tokens")
    negative = encode(clip, "")
    unrelated, target = encode(clip, "a bowl of fruit on a table"), encode(clip, "snoopy")
    assert torch.equal(ksample(model, unrelated, negative), ksample(patcher, unrelated, negative))
    assert not torch.equal(ksample(model, target, negative), ksample(patcher, target, negative))


def test_baking_a_single_block_membrane_is_refused(flux_folder):
    model = load_spm(flux_folder["patcher"], None, "single_snoopy.safetensors", transport="always_open")
    errors = pack_module("spm_core.errors")
    folder = flux_folder["folder"]
    for run in (lambda: node("SPMSaveAsLoRA").execute(model, "single_baked", overwrite=True),
                lambda: node("SPMMergeIntoModel").execute(model)):
        with pytest.raises(errors.SPMError, match="adapts Flux single blocks on the text tokens only, which a plain LoRA "
                                                  "or merged weights cannot express"):
            run()
    assert not (folder / "single_baked.safetensors").exists()


@pytest.mark.parametrize("single_blocks", [True, False])
def test_training_adapts_the_single_blocks_unless_switched_off(tmp_path, single_blocks):
    patcher, clip = build_flux_patcher(seed=3, prompt_gain=8), build_flux_clip(seed=4)
    membrane, reports, _ = train(patcher, clip, tmp_path / "trained.safetensors", iterations=3,
                                 single_blocks=single_blocks)
    adapted = {name for name in membrane.layers if is_text_token_layer(name)}
    assert adapted == ({"lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2"} if single_blocks else set())
    assert any(name == "lora_unet_txt_in" for name in membrane.layers)
    assert membrane.metadata["training"]["single_blocks"] is single_blocks
    assert set(load_membrane(str(tmp_path / "trained.safetensors")).layers) == set(membrane.layers)
