"""End to end through a real ComfyUI server: the pack loads, every shipped workflow runs from its
UI-format JSON, bad inputs come back as errors naming the problem, and the server keeps serving."""

import glob
import json
import math
import os
import uuid

import pytest
from membrane_helpers import BROKEN_MEMBRANES

from lab.comfy_server import SHIPPED, WORKFLOWS, for_test_models, load_workflow, shipped_workflow, workflow_to_api

# Training workflows first: "Miniature world 2" applies the membrane "Miniature world 1" saves.
SHIPPED_PATHS = sorted(glob.glob(os.path.join(WORKFLOWS, "*.json")), key=lambda p: ("train" not in os.path.basename(p).lower(), p))
TEST_ITERATIONS = 20  # the quality test (tests/test_miniworld_quality.py) trains for real
OUR_NODES = ["SPMLoader", "SPMTextEncode", "SPMTransportInspector", "SPMSaveAsLoRA", "SPMMergeIntoModel"]


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


def test_pack_nodes_are_served_with_tooltips(object_info):
    for name in OUR_NODES:
        assert name in object_info, f"{name} missing from /object_info: the pack did not load"
        info = object_info[name]
        for section in ("required", "optional"):
            for input_name, spec in info["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
    membranes = object_info["SPMLoader"]["input"]["required"]["membrane"]
    choices = membranes[1]["options"] if isinstance(membranes[0], str) else membranes[0]
    assert {"snoopy.safetensors", "mickey_mouse.safetensors", "van_gogh.safetensors"} <= set(choices)
    assert "nudity.pt" not in choices, "pickled files are never offered"


def test_every_node_has_a_help_page_served_to_the_frontend(comfy_server, object_info):
    """The frontend's node help panel fetches /extensions/<pack>/docs/<node id>.md."""
    ours = [name for name, info in object_info.items() if info.get("python_module", "").endswith("comfyui_spm")]
    assert set(OUR_NODES) <= set(ours)
    for name in ours:
        text = comfy_server.get(f"/extensions/comfyui_spm/docs/{name}.md").decode()
        assert text.startswith("# "), f"{name}: {text[:80]!r}"


def test_every_shipped_workflow_is_tested():
    assert sorted(SHIPPED.values()) == sorted(os.path.basename(p) for p in SHIPPED_PATHS)


@pytest.mark.parametrize("path", SHIPPED_PATHS, ids=[os.path.basename(p) for p in SHIPPED_PATHS])
def test_shipped_workflow_runs(comfy_server, object_info, path):
    """Each workflow as shipped, the SD1.5 ones on the tiny checkpoint (for_test_models)."""
    prompt = workflow_to_api(for_test_models(load_workflow(path)), object_info)
    assert any(node["class_type"] in ("SPMLoader", "SPMTrain") for node in prompt.values())
    for node in prompt.values():
        if node["class_type"] == "SPMTrain":
            node["inputs"]["iterations"] = min(node["inputs"]["iterations"], TEST_ITERATIONS)
    entry, events = comfy_server.run_with_events(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    images = [image for output in entry["outputs"].values() for image in output.get("images", [])]
    assert images, "the workflow produced no image"
    for image in images:
        if image["type"] == "output":
            assert os.path.getsize(os.path.join(comfy_server.base_dir, "output", image["subfolder"], image["filename"])) > 0
    if os.path.basename(path) == SHIPPED["inspector"]:
        table = next(output["text"][0] for output in entry["outputs"].values() if "text" in output)
        assert "snoopy" in table and "van_gogh" in table
    if os.path.basename(path) in (SHIPPED["miniature_dit"], SHIPPED["erase_flux"]):
        # on Flux (the miniature DiT) the membranes, SPM Train Membrane's and SPM Load Membrane's, are gated by
        # the concept's tokens: open for the prompt that names it
        gates = [event["data"] for event in events if event["type"] == "spm.gates"]
        assert gates, f"no spm.gates event among {sorted({event['type'] for event in events})}"
        (membrane,) = gates[-1]["membranes"]
        assert membrane["transport"] == "tokens" and membrane["positive"] == 1.0, membrane


def erase_prompt(object_info, **loader_inputs):
    prompt = workflow_to_api(for_test_models(shipped_workflow("erase")), object_info)
    loader = next(node for node in prompt.values() if node["class_type"] == "SPMLoader")
    loader["inputs"].update(loader_inputs)
    for node in prompt.values():
        if node["class_type"] == "KSampler":
            # a fresh seed: ComfyUI would otherwise answer a repeated prompt from its cache
            node["inputs"].update(steps=2, seed=uuid.uuid4().int % 2**32)
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=128, height=128)
    return prompt


@pytest.mark.parametrize("inputs, phrase", [
    ({"strength": math.nan}, "strength is nan"),
    ({"start_percent": 0.9, "end_percent": 0.1}, "sampling range 0.9..0.1 is invalid"),
    ({"rows": "sideways"}, "unknown rows 'sideways'; choose one of"),
    ({"transport": "fuzzy"}, "unknown transport mode 'fuzzy'"),
    ({"ramp": "zigzag"}, "unknown ramp 'zigzag'"),
    ({"negative_strength": math.nan}, "negative_strength is nan"),
])
def test_bad_input_fails_in_the_node_and_the_server_keeps_serving(comfy_server, object_info, inputs, phrase):
    entry = comfy_server.run(erase_prompt(object_info, **inputs))
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "SPMLoader"
    assert phrase in errors[0]["exception_message"], errors[0]["exception_message"]
    assert comfy_server.run(erase_prompt(object_info))["status"]["status_str"] == "success"


@pytest.mark.parametrize("name", list(BROKEN_MEMBRANES))
def test_every_broken_membrane_is_refused_in_the_node_and_the_server_keeps_serving(comfy_server, object_info, name):
    """ComfyUI 0.3.75 does not check V3 combo values against their options, so the node reads (or,
    for a pickle, refuses to read) whatever file is named, and says what is wrong with it."""
    entry = comfy_server.run(erase_prompt(object_info, membrane=name, transport="paper"))
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "SPMLoader", entry["status"]
    message = errors[0]["exception_message"]
    assert BROKEN_MEMBRANES[name] in message and name in message, message
    assert comfy_server.run(erase_prompt(object_info))["status"]["status_str"] == "success"


def test_a_missing_membrane_is_refused_when_queued_before_anything_runs(comfy_server, object_info):
    prompt = erase_prompt(object_info, membrane="does_not_exist.safetensors")
    code, response = comfy_server.queue(prompt)
    assert code == 400, (code, response)
    loader = next(key for key, node in prompt.items() if node["class_type"] == "SPMLoader")
    (error,) = response["node_errors"][loader]["errors"]
    assert "'does_not_exist.safetensors' not found in models/spm" in error["details"], error
    assert "prompt_id" not in response, "nothing was queued"


def test_gates_are_sent_to_the_frontend(comfy_server, object_info):
    entry, events = comfy_server.run_with_events(erase_prompt(object_info))
    assert entry["status"]["status_str"] == "success"
    gates = [event["data"] for event in events if event["type"] == "spm.gates"]
    assert gates, f"no spm.gates event among {sorted({event['type'] for event in events})}"
    (membrane,) = gates[-1]["membranes"]
    assert membrane["membrane"] == "snoopy" and membrane["concepts"] == ["snoopy"]
    assert membrane["positive"] == 1.0, "'snoopy sitting on a red doghouse' names the concept: token overlap 1"
    assert membrane["negative"] == 0.0, "negative rows are closed (positive only)"
    assert membrane["node"] is not None


def test_interrupting_training_keeps_a_valid_partial_file_and_the_server_serves(comfy_server, object_info):
    """Cancel mid-training through the real /interrupt: the server stays up, models/spm holds
    <name>.partial.safetensors (valid, with how far it got) and no final file; the next prompt runs."""
    import threading
    import time

    from spm_core.file_format import load_membrane

    prompt = workflow_to_api(for_test_models(shipped_workflow("train_then_apply")), object_info)
    trainer = next(node for node in prompt.values() if node["class_type"] == "SPMTrain")
    name = f"cancelled_{uuid.uuid4().hex[:8]}"
    trainer["inputs"].update(iterations=100000, name=name, latent_size=8)
    folder = os.path.join(comfy_server.base_dir, "models", "spm")

    def interrupt_once_training_runs():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            queue = comfy_server.get("/queue")
            if queue["queue_running"] and progress_seen.is_set():
                comfy_server.post("/interrupt", {})
                return
            time.sleep(0.2)

    progress_seen = threading.Event()
    watcher = threading.Thread(target=interrupt_once_training_runs, daemon=True)
    entry = _run_watching_progress(comfy_server, prompt, progress_seen, watcher)
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
    assert not os.path.exists(os.path.join(folder, name + ".safetensors"))
    partial = load_membrane(os.path.join(folder, name + ".partial.safetensors"))
    done = partial.metadata["training"]["completed_iterations"]
    assert 1 <= done < 100000 and partial.metadata["training"]["iterations"] == 100000
    assert comfy_server.run(erase_prompt(object_info))["status"]["status_str"] == "success"


def _run_watching_progress(server, prompt, progress_seen, watcher):
    """Run `prompt`, start `watcher` once it is queued, set `progress_seen` once the server reports
    progress; the prompt's history entry."""
    import asyncio

    import aiohttp

    client_id = str(uuid.uuid4())

    async def listen():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.url}/ws?clientId={client_id}") as socket:
                code, response = server.queue(prompt, client_id)
                assert code == 200, response
                watcher.start()
                async for message in socket:
                    if message.type != aiohttp.WSMsgType.TEXT:
                        continue
                    event = json.loads(message.data)
                    if event["type"] == "progress" and event["data"].get("value", 0) >= 1:
                        progress_seen.set()
                    if event["type"] in ("execution_interrupted", "execution_success", "execution_error") \
                            and event["data"].get("prompt_id") == response["prompt_id"]:
                        return response["prompt_id"]

    prompt_id = asyncio.run(asyncio.wait_for(listen(), 300))
    return server.wait(prompt_id)
