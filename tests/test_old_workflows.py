"""Every workflow the pack ever shipped keeps running (issue 16, finding 9).

tests/old_workflows/ holds each version of each file of workflows/ from the repository's history,
named `<commit that shipped it>_<file name>.json`, and beside it `<same>.api.json`: its API-format
prompt as exported at that commit (lab/comfy_server.workflow_to_api, which assigns widget values
as the frontend does, with the /object_info of a server running the pack at that commit). Each
runs, unchanged, through today's real server: inputs added since then are optional, and their
absence means what it meant then. Each UI file, opened today, puts every saved value into the
input it was saved from (the frontend assigns widget values by position, so an input added in the
middle of a node's widgets would shift them).

A workflow changed in workflows/ is kept the same way: this test fails until the new version is
there (SPM_KEEP_WORKFLOWS=<commit or label> writes both files for it).

The SD1.5 workflows run on the tests' tiny checkpoint and every training on a CPU budget
(`sized_for_tests`, by input name); nothing else is changed."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
import torch

from lab.comfy_server import FLUX_CHECKPOINT, WORKFLOWS, ComfyServer, load_workflow, workflow_to_api

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "old_workflows")
UI_FILES = sorted(p for p in glob.glob(os.path.join(FIXTURES, "*.json")) if not p.endswith(".api.json"))
# Saved without the value of the seed's "control after generate" widget, which every ComfyUI frontend
# adds to an input named seed: no frontend could open it with its values in place, then or now. Its
# API twin (what the pack's own tests sent at that commit) runs.
SEED_WITHOUT_CONTROL = {"c5ea996_train_then_apply.json"}
TINY_CHECKPOINT = "tiny-sd15.safetensors"
MINIATURE_ITERATIONS = 4


def api_twin(ui_path: str) -> str:
    return ui_path[: -len(".json")] + ".api.json"


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def sized_for_tests(prompt: dict) -> dict:
    """A copy of an API prompt on the tiny SD1.5 checkpoint (256 px, 6 steps, a 4-iteration training)
    when it loads an SD1.5 checkpoint; on the miniature DiT (128 px, 4 steps) when it loads Flux.1-dev, as
    for_test_models does for the UI files; a miniature-world training capped at MINIATURE_ITERATIONS."""
    prompt = json.loads(json.dumps(prompt))
    loaders = [node for node in prompt.values() if node["class_type"] == "CheckpointLoaderSimple"]
    if any(node["inputs"]["ckpt_name"] == FLUX_CHECKPOINT for node in loaders):
        for node in prompt.values():
            if node["class_type"] == "CheckpointLoaderSimple":
                node.update(class_type="SPMExampleLoadMiniatureDiT", inputs={})
            elif node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"):
                node["inputs"].update(width=128, height=128)
            elif node["class_type"] == "KSampler":
                node["inputs"]["steps"] = 4
        return prompt
    on_checkpoint = bool(loaders)
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = TINY_CHECKPOINT
        elif on_checkpoint and kind == "EmptyLatentImage":
            inputs.update(width=256, height=256)
        elif on_checkpoint and kind == "KSampler":
            inputs["steps"] = 6
        elif kind == "SPMTrain":
            inputs.update(dict(iterations=4, learning_rate=1e-3, rollout_steps=4, latent_size=8) if on_checkpoint
                          else dict(iterations=min(inputs["iterations"], MINIATURE_ITERATIONS)))
    return prompt


def trained_names(prompt: dict) -> list[str]:
    return [node["inputs"]["name"] for node in prompt.values() if node["class_type"] == "SPMTrain"]


def canonical(prompt: dict) -> str:
    return json.dumps(prompt, sort_keys=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server of its own: the old trainings write models/spm files the shared one's tests expect absent."""
    from conftest import COMFYUI_ROOT

    from lab.tiny_assets import install_assets

    base = tmp_path_factory.mktemp("old_workflows_base")
    install_assets(str(base / "models"))
    with ComfyServer(COMFYUI_ROOT, str(base)) as running:
        yield running


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


@pytest.fixture(scope="module")
def results(server):
    """Every distinct sized API prompt of the fixtures, run once: the trainings first (each one's file
    moved aside after it ran, so the next training of that name is not refused for it), then the
    rest, with the first membrane of each name put back in models/spm (the miniature world's erase
    workflows apply the snowman its training workflow saved). Canonical prompt -> history entry."""
    prompts = {canonical(p): p for p in (sized_for_tests(read_json(api_twin(ui))) for ui in UI_FILES)}
    folder = os.path.join(server.base_dir, "models", "spm")
    kept = os.path.join(server.base_dir, "trained")
    os.makedirs(kept, exist_ok=True)
    entries = {}
    for key, prompt in prompts.items():
        if trained_names(prompt):
            entries[key] = server.run(prompt)
            for name in trained_names(prompt):
                path = os.path.join(folder, name + ".safetensors")
                if os.path.exists(path) and not os.path.exists(os.path.join(kept, name + ".safetensors")):
                    shutil.move(path, kept)
                elif os.path.exists(path):
                    os.remove(path)
    for name in os.listdir(kept):
        shutil.copy2(os.path.join(kept, name), folder)
    for key, prompt in prompts.items():
        if not trained_names(prompt):
            entries[key] = server.run(prompt)
    return entries


@pytest.mark.parametrize("ui_path", UI_FILES, ids=[os.path.basename(p) for p in UI_FILES])
def test_old_api_prompt_runs_unchanged(results, ui_path):
    entry = results[canonical(sized_for_tests(read_json(api_twin(ui_path))))]
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    assert any(output.get("images") for output in entry["outputs"].values()), "the workflow produced no image"


@pytest.mark.parametrize("ui_path", [p for p in UI_FILES if os.path.basename(p) not in SEED_WITHOUT_CONTROL],
                         ids=[os.path.basename(p) for p in UI_FILES if os.path.basename(p) not in SEED_WITHOUT_CONTROL])
def test_old_ui_workflow_opens_with_every_value_in_its_input(object_info, ui_path):
    """Today's node definitions read the UI file into exactly the prompt it was exported as, which runs above."""
    assert workflow_to_api(read_json(ui_path), object_info) == read_json(api_twin(ui_path))


def test_every_fixture_has_its_api_twin():
    assert len(UI_FILES) >= 40
    assert sorted(glob.glob(os.path.join(FIXTURES, "*.api.json"))) == [api_twin(p) for p in UI_FILES]


def test_every_shipped_workflow_is_kept(object_info):
    """The workflows shipped now are among the fixtures, with the API prompt today's frontend exports."""
    fixtures = {}
    for path in UI_FILES:
        with open(path, "rb") as handle:
            fixtures.setdefault(handle.read(), path)
    label = os.environ.get("SPM_KEEP_WORKFLOWS", "")
    missing = []
    for shipped in sorted(glob.glob(os.path.join(WORKFLOWS, "*.json"))):
        with open(shipped, "rb") as handle:
            content = handle.read()
        exported = workflow_to_api(load_workflow(shipped), object_info)
        kept = fixtures.get(content)
        if kept is not None and read_json(api_twin(kept)) == exported:
            continue
        if not label:
            missing.append(os.path.basename(shipped))
            continue
        target = os.path.join(FIXTURES, f"{label}_{os.path.basename(shipped)}")
        with open(target, "wb") as handle:
            handle.write(content)
        with open(api_twin(target), "w", encoding="utf-8") as handle:
            json.dump(exported, handle, indent=1, sort_keys=True)
            handle.write("\n")
    assert not missing, (f"{missing} changed since they were kept in tests/old_workflows: run this test with "
                         "SPM_KEEP_WORKFLOWS=<short commit or label> to keep this version too, so later versions keep running it")


def test_a_loader_saved_before_negative_strength_acts_on_negative_rows_at_its_strength(spm_world):
    """Before negative_strength existed, rows 'positive and negative' acted at `strength` on both."""
    from pack import encode, load_spm, sample

    patcher, clip, _ = spm_world
    positive, negative = encode(clip, "snoopy on a skateboard"), encode(clip, "snoopy, blurry")

    def run(**negative_strength):
        model = load_spm(patcher, clip, "snoopy.safetensors", transport="always_open", rows="positive and negative",
                         strength=0.5, **negative_strength)
        return sample(model, positive, negative, steps=2)

    saved_before = run()
    assert torch.equal(saved_before, run(negative_strength=0.5))
    assert not torch.equal(saved_before, run(negative_strength=1.0))


def test_a_training_saved_before_contexts_trains_the_papers_loop(spm_world, tmp_path):
    from pack import node, pack_module

    patcher, clip, folder = spm_world
    with torch.inference_mode(False):
        output = node("SPMTrain").execute(
            model=patcher, clip=clip, target="snoopy", surrogate="", neutral="", iterations=1, learning_rate=1e-3, rank=1,
            alpha=1.0, anchor_strength=1.0, anchor_samples=1, surrogate_sampler="prompts", erase_guidance=1.0,
            rollout_steps=2, latent_size=8, seed=0, name=f"before_contexts_{os.getpid()}", resume=False)
    path = output.result[2]
    try:
        assert pack_module("spm_core.file_format").load_membrane(path).metadata["training"]["contexts"] == 0
    finally:
        os.remove(path)
