"""Run a real ComfyUI server for the demo and the end-to-end tests, and drive it over HTTP:
UI-format workflows are converted to API format with the server's own /object_info.

The server gets its own base directory (models, custom_nodes, input, output, user), so the
shared host tree is never written to; this pack is linked into its custom_nodes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

from .host import REPO

PACK_NAME = "comfyui_spm"
SKIPPED_NODE_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """`with ComfyServer(comfy_root, base_dir) as server:` starts main.py --cpu and waits for it.

    front_end_root: a frontend's static folder (`<dir>/comfyui_frontend_package/static` of a
    `comfyui-frontend-package` installed elsewhere) served instead of the one the host pins."""

    def __init__(self, comfy_root: str, base_dir: str, python: str = sys.executable, startup_timeout: float = 240,
                 front_end_root: str | None = None) -> None:
        self.comfy_root, self.base_dir, self.python = comfy_root, os.path.abspath(base_dir), python
        self.front_end_root = front_end_root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.log_path = os.path.join(self.base_dir, "server.log")
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ComfyServer:
        custom_nodes = os.path.join(self.base_dir, "custom_nodes")
        os.makedirs(custom_nodes, exist_ok=True)
        link = os.path.join(custom_nodes, PACK_NAME)
        if not os.path.exists(link):
            os.symlink(REPO, link)
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", self.base_dir, "--disable-auto-launch", "--database-url", "sqlite:///:memory:",
             *(["--front-end-root", self.front_end_root] if self.front_end_root else [])],
            cwd=self.comfy_root, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/object_info/KSampler", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        self.__exit__()
        raise TimeoutError(f"ComfyUI did not answer within {self.startup_timeout}s:\n{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()

    def log_tail(self, chars: int = 6000) -> str:
        with open(self.log_path, errors="replace") as handle:
            return handle.read()[-chars:]

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            body = response.read()
            return json.loads(body) if response.headers.get_content_type() == "application/json" else body

    def post(self, path: str, payload: dict) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def object_info(self) -> dict:
        return self.get("/object_info")

    def queue(self, api_prompt: dict, client_id: str | None = None) -> tuple[int, dict]:
        return self.post("/prompt", {"prompt": api_prompt, "client_id": client_id or str(uuid.uuid4())})

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """The prompt's history entry once it has finished (successfully or not)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log_tail()}")

    def run_with_events(self, api_prompt: dict, timeout: float = 300) -> tuple[dict, list[dict]]:
        """Run a prompt while listening on the websocket: its history entry and every JSON event
        the server sent this client (progress, executed, and custom ones such as spm.gates)."""
        import asyncio

        import aiohttp

        client_id = str(uuid.uuid4())

        async def listen() -> tuple[str, list[dict]]:
            events: list[dict] = []
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"{self.url}/ws?clientId={client_id}") as socket:
                    code, response = self.queue(api_prompt, client_id)
                    if code != 200:
                        raise RuntimeError(f"/prompt refused the workflow ({code}): {json.dumps(response)[:3000]}")
                    async for message in socket:
                        if message.type != aiohttp.WSMsgType.TEXT:
                            continue  # binary frames are previews
                        event = json.loads(message.data)
                        events.append(event)
                        data = event.get("data") or {}
                        if data.get("prompt_id") == response["prompt_id"] and (
                                event["type"] in ("execution_success", "execution_error", "execution_interrupted")):
                            return response["prompt_id"], events
            raise ConnectionError("the websocket closed before the prompt finished")

        prompt_id, events = asyncio.run(asyncio.wait_for(listen(), timeout))
        return self.wait(prompt_id, timeout), events

    def run(self, api_prompt: dict, timeout: float = 300) -> dict:
        code, response = self.queue(api_prompt)
        if code != 200:
            raise RuntimeError(f"/prompt refused the workflow ({code}): {json.dumps(response)[:3000]}")
        return self.wait(response["prompt_id"], timeout)


def workflow_to_api(workflow: dict, object_info: dict) -> dict:
    """A UI-format workflow (what the frontend saves) as the API prompt /prompt takes.

    Widget values are matched to input names in the node's declared input order, skipping
    linked inputs; an input with control_after_generate stores one extra value in the UI file.
    """
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in SKIPPED_NODE_TYPES or node.get("mode", 0) in (2, 4):  # muted or bypassed
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise KeyError(f"node type {node['type']!r} is not known to this server (is its pack installed?)")
        linked = {slot["name"]: links[slot["link"]] for slot in node.get("inputs", []) if slot.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for section in ("required", "optional"):
            for name in info.get("input_order", {}).get(section, []):
                spec = info["input"][section][name]
                kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
                if name in linked:
                    link = linked[name]
                    inputs[name] = [str(link[1]), link[2]]
                    if _is_widget(kind) and values and section == "required" and _widget_converted(node, name):
                        values.pop(0)
                elif _is_widget(kind) and values:
                    inputs[name] = values.pop(0)
                    if options.get("control_after_generate") and values:
                        values.pop(0)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _is_widget(kind) -> bool:
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _widget_converted(node: dict, name: str) -> bool:
    """A widget turned into an input socket keeps its slot in widgets_values."""
    return any(slot["name"] == name and "widget" in slot for slot in node.get("inputs", []))


def load_workflow(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


WORKFLOWS = os.path.join(REPO, "workflows")
SHIPPED = {  # what the tests and the demo call the shipped workflows (the file names are their titles)
    "erase": "SPM - Erase one concept (SD1.5).json",
    "chain": "SPM - Chain three membranes (SD1.5).json",
    "before_after": "SPM - Before and after (SD1.5).json",
    "inspector": "SPM - Inspect the gates (SD1.5).json",
    "train_then_apply": "SPM - Train, then apply (SD1.5).json",
    "miniworld_train": "SPM - Miniature world 1, train.json",
    "miniworld_erase": "SPM - Miniature world 2, erase.json",
    "miniature_dit": "SPM - Miniature DiT, train and erase.json",
    "erase_flux": "SPM - Erase one concept (Flux).json",
}
SD15_CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
FLUX_CHECKPOINT = "flux1-dev-fp8.safetensors"


def shipped_workflow(key: str) -> dict:
    return load_workflow(os.path.join(WORKFLOWS, SHIPPED[key]))


def for_test_models(workflow: dict, checkpoint: str = "tiny-sd15.safetensors") -> dict:
    """A shipped workflow on what the test machine has, sized for a CPU. Changes `workflow` in place.

    - SD1.5 (Load Checkpoint naming SD15_CHECKPOINT): the tests' tiny checkpoint, 256 px, 6 steps, SPM Train
      Membrane cut to 8 iterations.
    - Flux (Load Checkpoint naming FLUX_CHECKPOINT): no Flux.1-dev here, so the checkpoint loader is swapped for
      SPM Example: Load Miniature DiT (a tiny Flux.1 from ComfyUI's classes, the same MODEL / CLIP / VAE outputs,
      no widgets; node id, links and position kept), the latent cut to 128x128 (its 16x16 latent) and the
      samplers to 4 steps. The membrane names stay: lab/tiny_assets.py writes `pikachu.safetensors` as a random
      membrane bound to the miniature DiT's layers (architecture flux), so SPM Load Membrane reads a real Flux
      membrane through the `tokens` gate. FluxGuidance stays; the miniature DiT has no guidance input and ignores it.
    - Workflows on the miniature models are returned as they are."""
    nodes = workflow["nodes"]
    loaders = {n["widgets_values"][0] for n in nodes if n["type"] == "CheckpointLoaderSimple"}
    if FLUX_CHECKPOINT in loaders:
        for node in nodes:
            values = node.get("widgets_values")
            if node["type"] == "CheckpointLoaderSimple" and values[0] == FLUX_CHECKPOINT:
                node["type"] = "SPMExampleLoadMiniatureDiT"
                node["widgets_values"] = []
                node["properties"] = {"Node name for S&R": "SPMExampleLoadMiniatureDiT"}
            elif node["type"] in ("EmptyLatentImage", "EmptySD3LatentImage"):
                values[:2] = [128, 128]
            elif node["type"] == "KSampler":
                values[2] = 4
        return workflow
    if SD15_CHECKPOINT not in loaders:
        return workflow
    for node in nodes:
        values = node.get("widgets_values")
        if node["type"] == "CheckpointLoaderSimple":
            values[0] = checkpoint
        elif node["type"] == "EmptyLatentImage":
            values[:2] = [256, 256]
        elif node["type"] == "KSampler":
            values[2] = 6
        elif node["type"] == "SPMTrain":  # iterations, learning_rate ... rollout_steps, latent_size
            values[3], values[4], values[11], values[12] = 8, 1e-3, 4, 8
    return workflow
