"""The frontend in a real browser: Debian Chromium (headless, driven over the DevTools protocol
with aiohttp) opens the real ComfyUI frontend served by the `comfy_server` fixture.

Checks: our extension (web/spm.js) is fetched and registered; the frontend's node search finds SPM
Load Membrane by "erase", "concept", "membrane" and "SPM"; every shipped workflow loads exactly (widget
values), with no node smaller than the frontend needs and none overlapping, and is listed by the
template browser with its thumbnail; the SPM Load Membrane node of "SPM - Erase one concept" (on
the test checkpoint) shows what its membrane erases; after a run queued from the page it shows the
membrane's rank/transport and the gates the server sent in `spm.gates`, also when the server
answered the node from its cache; events naming unknown nodes or carrying no data are ignored; the
label survives a page reload; opening an SD1.5 workflow without its checkpoint offers the
download; the miniature world's training workflow queued from the page trains (and queued again
unchanged does not retrain), a refresh offers the new membrane and the erase workflow runs with
it; and nothing from our script reaches the console.

Screenshots are kept in out/browser/: every workflow as loaded, the template browser, the runs,
load_spm.png. SPM_UPDATE_DOCS=1 also writes the workflows' thumbnails (workflows/<title>.jpg) and
docs/images/browser_load_spm.png and browser_templates.png for the README.

Chromium comes from scripts/install_browser.sh (called by scripts/test.sh).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

import aiohttp
import pytest

from scripts.comfy_server import PACK_NAME as PACK
from scripts.comfy_server import SHIPPED, WORKFLOWS, for_test_models, load_workflow, shipped_workflow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = os.environ.get("SPM_CHROMIUM", "/usr/bin/chromium")
EXTENSION = "comfyui_spm.membrane_info"
SCRIPT_URL = "/extensions/comfyui_spm/spm.js"
OURS = ("spm.js", "comfyui_spm", EXTENSION)
VIEWPORT = (1280, 800)
SHOTS = os.path.join(REPO, "out", "browser")
SCREENSHOT = os.path.join(SHOTS, "load_spm.png")
FAILED_SCREENSHOT = os.path.join(SHOTS, "failed.png")
THUMBNAIL = (512, 320)
DOCS_SCREENSHOT = os.path.join(REPO, "docs", "images", "browser_load_spm.png")
TEMPLATES_DOCS_SCREENSHOT = os.path.join(REPO, "docs", "images", "browser_templates.png")
LOADER_ID = 6  # the SPM Load Membrane node in workflows/erase_one_concept.json
# sizes against the frontend's own computeSize, and overlaps with title bars counted
LAYOUT_PROBLEMS = """(() => {
    const title = window.LiteGraph.NODE_TITLE_HEIGHT, nodes = window.app.graph.nodes, problems = [];
    const box = n => [n.pos[0], n.pos[1] - title, n.pos[0] + n.size[0], n.pos[1] + n.size[1]];
    for (const n of nodes) {
        const need = n.computeSize();
        if (n.size[0] + 0.5 < need[0] || n.size[1] + 0.5 < need[1])
            problems.push(`#${n.id} ${n.type} is ${n.size.join('x')} but needs ${need.join('x')}`);
    }
    nodes.forEach((a, i) => nodes.slice(i + 1).forEach(b => {
        const [p, q] = [box(a), box(b)];
        if (p[0] < q[2] && q[0] < p[2] && p[1] < q[3] && q[1] < p[3]) problems.push(`#${a.id} ${a.type} overlaps #${b.id} ${b.type}`);
    }));
    return problems;
})()"""
STORE = ("[...document.querySelectorAll('*')].find(e => e.__vue_app__)"  # one of the frontend's pinia stores
         ".__vue_app__.config.globalProperties.$pinia._s.get({name!r})")
LABEL = "(window.app.graph.getNodeById({id})?.widgets ?? []).find(w => w.name === 'spm_info')?.value ?? null"


class Chromium:
    """`with Chromium() as browser:` a headless Chromium with a fresh profile; browser.port is its
    DevTools port."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", "--mute-audio", f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}",
             "--remote-debugging-port=0"]

    def __enter__(self) -> Chromium:
        self.profile = tempfile.mkdtemp(prefix="spm-chromium-")
        self.log = open(os.path.join(self.profile, "chromium.log"), "w+")
        self.process = subprocess.Popen([CHROMIUM, *self.FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.__exit__()
                raise RuntimeError(f"chromium exited with {self.process.returncode}")
            if os.path.exists(port_file):
                lines = open(port_file).read().split()
                if lines:
                    self.port = int(lines[0])
                    return self
            time.sleep(0.1)
        self.__exit__()
        raise TimeoutError("chromium did not open its DevTools port within 60 s")

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # chromium and its own child processes
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(15)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """A DevTools session on one page target: commands, events, and JS evaluation."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session, self.ws = session, ws
        self.events: list[tuple[str, dict]] = []
        self._pending: dict[int, asyncio.Future] = {}
        self._next_id = 0
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, session: aiohttp.ClientSession, port: int) -> Page:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        page = next(t for t in targets if t["type"] == "page")
        ws = await session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        return cls(session, ws)

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            future = self._pending.pop(data.get("id"), None)
            if future is not None and not future.done():
                future.set_result(data)
            elif "method" in data:
                self.events.append((data["method"], data.get("params", {})))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("DevTools connection closed"))

    async def send(self, method: str, timeout: float = 60, **params) -> dict:
        self._next_id += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        await self.ws.send_json({"id": self._next_id, "method": method, "params": params})
        reply = await asyncio.wait_for(future, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def evaluate(self, expression: str, timeout: float = 60):
        result = await self.send("Runtime.evaluate", timeout=timeout, expression=expression,
                                 awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(f"page threw: {details.get('exception', {}).get('description') or details.get('text')}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, what: str):
        """Polls `expression` until it is truthy; fails naming `what` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = await self.evaluate(expression)
            except RuntimeError as error:  # e.g. the page is still navigating
                value = str(error)
            else:
                if value:
                    return value
            await asyncio.sleep(0.25)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value: {value!r}")

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


def describe_event(method: str, params: dict) -> str | None:
    """One line for a console message, uncaught exception or browser log entry; None otherwise."""
    if method == "Runtime.consoleAPICalled":
        text = " ".join(str(a.get("value", a.get("description", a.get("type")))) for a in params.get("args", []))
        frames = params.get("stackTrace", {}).get("callFrames", [])
        where = frames[0]["url"] if frames else ""
        return f"console.{params.get('type')}: {text} [{where}]"
    if method == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails", {})
        frames = details.get("stackTrace", {}).get("callFrames", [])
        description = details.get("exception", {}).get("description") or details.get("text")
        return f"uncaught: {description} [{details.get('url', '')} {' '.join(f['url'] for f in frames)}]"
    if method == "Log.entryAdded":
        entry = params.get("entry", {})
        return f"log.{entry.get('level')}: {entry.get('text')} [{entry.get('url', '')}]"
    return None


def print_console(events: list[tuple[str, dict]]) -> list[str]:
    messages = [line for line in (describe_event(m, p) for m, p in events) if line]
    print("\nbrowser console, for the record:", *messages, sep="\n  ")
    return messages


def save(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def small_run(workflow: dict) -> dict:
    """The erase workflow on the test checkpoint, made quicker, with a fresh seed so nothing is cached."""
    for node in workflow["nodes"]:
        if node["type"] == "KSampler":
            node["widgets_values"][0] = uuid.uuid4().int % 2**32
            node["widgets_values"][1] = "fixed"
            node["widgets_values"][2] = 2
        if node["type"] == "EmptyLatentImage":
            node["widgets_values"][:2] = [128, 128]
    return workflow


def png_checks(png: bytes, box: dict) -> None:
    from PIL import Image

    assert png[:8] == b"\x89PNG\r\n\x1a\n", "the screenshot is not a PNG"
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size == VIEWPORT, image.size
    colors = image.getcolors(maxcolors=1_000_000)
    assert colors is None or len(colors) > 200, f"the screenshot is nearly uniform ({len(colors)} colours)"
    # The label area (computed from the node's widget geometry) must hold text: light pixels on the
    # dark node body. Text drawn off-screen, or not drawn at all, fails here.
    crop = image.crop((round(box["x0"]), round(box["y0"]), round(box["x1"]), round(box["y1"]))).convert("L")
    bright = sum(1 for v in crop.tobytes() if v > 150)
    assert bright > 150, f"no text visible where the SPM label should be ({box}); {bright} light pixels"


async def load(page: Page, workflow: dict, key: str) -> None:
    """As the template browser loads shipped workflow `key` (named by its title), without the
    missing-models dialog (the SD1.5 checkpoint is not on the test server)."""
    title = SHIPPED[key].removesuffix(".json")
    await page.evaluate(f"window.app.loadGraphData({json.dumps(workflow)}, true, true, {json.dumps(title)},"
                        " {showMissingModelsDialog: false}).then(() => true)")


async def fitted_screenshot(page: Page) -> bytes:
    """The whole graph in view (like the frontend's fit view), below the tab bar and the Run
    button and right of the side bar, as PNG bytes of that part of the window."""
    await page.evaluate("""(async () => {
        const app = window.app, title = window.LiteGraph.NODE_TITLE_HEIGHT, nodes = app.graph.nodes;
        const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - title));
        const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
        const rect = app.canvas.canvas.getBoundingClientRect(), view = {left: 80, top: 100, right: 1260, bottom: 780};
        const width = view.right - view.left, height = view.bottom - view.top;
        const scale = Math.min(1, width / (x1 - x0), height / (y1 - y0));
        app.canvas.ds.scale = scale;
        app.canvas.ds.offset = [(view.left - rect.left + (width - (x1 - x0) * scale) / 2) / scale - x0,
                                (view.top - rect.top + (height - (y1 - y0) * scale) / 2) / scale - y0];
        app.canvas.setDirty(true, true);
        const frame = () => new Promise(r => requestAnimationFrame(r));
        await frame(); await frame(); await frame();
        return true;
    })()""")
    shot = await page.send("Page.captureScreenshot", format="png", clip=dict(x=60, y=40, width=1220, height=760, scale=1))
    return base64.b64decode(shot["data"])


def save_for_docs(png: bytes, path: str) -> None:
    """The README's copy of a screenshot, as a small 256-colour PNG."""
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(path, optimize=True)


def write_thumbnails(shots: dict[str, bytes]) -> None:
    """workflows/<title>.jpg: what the template browser shows for each workflow."""
    from PIL import Image

    for key, png in shots.items():
        image = Image.open(io.BytesIO(png)).convert("RGB").resize(THUMBNAIL, Image.LANCZOS)
        image.save(os.path.join(WORKFLOWS, SHIPPED[key].removesuffix(".json") + ".jpg"), quality=80, optimize=True)


async def browse(url: str, workflow: dict, output_dir: str) -> tuple[bytes, dict, list[tuple[str, dict]]]:
    with Chromium() as browser:
        async with aiohttp.ClientSession() as session:
            page = await Page.open(session, browser.port)
            try:
                return await drive(page, url, workflow, output_dir)
            except BaseException:  # keep what the page looked like and said, then fail
                try:
                    shot = await page.send("Page.captureScreenshot", timeout=10, format="png")
                    save(FAILED_SCREENSHOT, base64.b64decode(shot["data"]))
                    print(f"\nscreenshot of the failure: {FAILED_SCREENSHOT}")
                except Exception as error:
                    print(f"\nno screenshot of the failure: {error}")
                print_console(page.events)
                raise
            finally:
                await page.close()


async def drive(page: Page, url: str, workflow: dict, output_dir: str):
    for domain in ("Runtime", "Log", "Page", "Network"):
        await page.send(f"{domain}.enable")
    await page.send("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0], height=VIEWPORT[1],
                    deviceScaleFactor=1, mobile=False)
    # a returning user: no first-run templates dialog, no "try Nodes 2.0" banner
    await page.send("Page.addScriptToEvaluateOnNewDocument", source="localStorage.setItem('vueNodesBannerDismissed', 'true')")
    await page.send("Page.navigate", url=url)
    app_ready = ("!!(window.app && window.app.graph && window.app.canvas && window.LiteGraph"
                 " && window.LiteGraph.registered_node_types['SPMLoader'])")
    await page.wait_for(app_ready, 120, "the frontend to register the node types")

    # 1. our extension is registered and its script was served
    names = await page.evaluate("window.app.extensions.map(e => e.name)")
    assert EXTENSION in names, f"extension {EXTENSION} not registered; have {len(names)}: {names}"
    fetched = [p["response"] for m, p in page.events if m == "Network.responseReceived" and p["response"]["url"].endswith(SCRIPT_URL)]
    assert fetched and fetched[-1]["status"] == 200, f"{SCRIPT_URL} was not fetched: {fetched}"

    # 1b. an SPM Train Membrane added by hand keeps its seed ("randomize" would retrain on every queue)
    control = await page.evaluate("(() => { const n = window.LiteGraph.createNode('SPMTrain'); window.app.graph.add(n);"
                                  " const v = n.widgets.find(w => w.name === 'seed').linkedWidgets[0].value;"
                                  " window.app.graph.remove(n); return v; })()")
    assert control == "fixed", f"a new SPM Train Membrane's seed control is {control!r}"

    # 1c. the frontend's own node search finds the loader by the words users type
    search = STORE.format(name="nodeDef") + ".nodeSearchService"
    found = await page.evaluate(f"Object.fromEntries(['erase', 'concept', 'membrane', 'SPM'].map(q => "
                                f"[q, {search}.searchNode(q).slice(0, 3).map(n => n.name)]))")
    for query, names in found.items():
        assert "SPMLoader" in names, f"searching {query!r} shows {names}, not SPM Load Membrane"

    # 2. the shipped workflows, as the template browser offers them
    await shipped_workflows_in_the_page(page)

    # 3. the workflow renders, with the concept label derived from the file name
    await load(page, workflow, "erase")
    label = await page.wait_for(LABEL.format(id=LOADER_ID), 20, "the SPM Load Membrane label")
    assert label == "erases: snoopy (from the file name)", label

    # 4. a run queued from the page: the ui payload and the spm.gates event reach the node
    await page.evaluate("""(api => {
        api.addEventListener('spm.gates', e => { window.__spmGates = e.detail });
        api.addEventListener('execution_cached', e => { window.__spmCached = e.detail?.nodes ?? [] });
        api.addEventListener('executed', e => {
            if (e.detail?.output?.spm_membrane) window.__spmMembrane = e.detail.output.spm_membrane[0];
        });
        for (const end of ['execution_success', 'execution_error', 'execution_interrupted'])
            api.addEventListener(end, e => { window.__spmRunEnded = `${end} ${e.detail?.exception_message ?? ''}`.trim() });
        return true;
    })(window.comfyAPI.api.api)""")
    await page.evaluate("window.app.queuePrompt(0).then(() => true)")
    ended = await page.wait_for("window.__spmRunEnded", 300, "the run queued from the page to end")
    assert ended == "execution_success", ended
    label = await page.wait_for(f"(l => l && l.includes('gate last step') && l)({LABEL.format(id=LOADER_ID)})",
                                10, "the gates of the run to reach the SPM Load Membrane node")
    gates, membrane, cached = await page.evaluate("[window.__spmGates, window.__spmMembrane, window.__spmCached]")
    row = next(r for r in gates["membranes"] if str(r["node"]) == str(LOADER_ID))
    assert row["concepts"] == ["snoopy"], row
    if str(LOADER_ID) in cached:  # a cached node sends no ui payload: the gates event carries the details
        assert membrane is None, membrane
        print("\nthe SPM Load Membrane node was cached (the /free before the run lost a race)")
    else:
        assert membrane["concepts"] == ["snoopy"] and membrane["rank"] == 1, membrane
    assert label.splitlines() == [
        "erases: snoopy",
        f"rank 1 · {row['layers']} layers · transport: paper",
        f"gate last step: positive {row['positive']:.2f} · negative {row['negative']:.2f}",
    ], label

    # 5. the screenshot: 100 % zoom, the checkpoint loader, SPM Load Membrane and the sampler in view
    box = await page.evaluate(f"""(async () => {{
        const app = window.app, node = app.graph.getNodeById({LOADER_ID});
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [-node.pos[0] + 480, -node.pos[1] + 190];
        app.canvas.setDirty(true, true);
        const frame = () => new Promise(r => requestAnimationFrame(r));
        await frame(); await frame(); await frame();
        const w = node.widgets.find(w => w.name === 'spm_info'), rect = app.canvas.canvas.getBoundingClientRect();
        const [x0, y0] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] + w.y]);
        const bottom = node.pos[1] + w.y + w.computeSize(node.size[0])[1];
        const [x1, y1] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0], bottom]);
        const box = {{x0: rect.left + x0, y0: rect.top + y0, x1: rect.left + x1, y1: rect.top + y1}};
        box.onTop = document.elementFromPoint((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2) === app.canvas.canvas;
        return box;
    }})()""")
    assert box["onTop"], f"something covers the SPM Load Membrane label at {box}"
    shot = await page.send("Page.captureScreenshot", format="png")
    png = base64.b64decode(shot["data"])

    # 6. events with no data or naming nodes that are not in the graph are ignored
    await page.evaluate("""(() => {
        const api = window.comfyAPI.api.api;
        for (const detail of [null, {}, {membranes: null}, {membranes: [null, {}, {node: '999'}, {node: '1'}, {node: '999:6'}]}])
            api.dispatchCustomEvent('spm.gates', detail);
        return true;
    })()""")
    after = await page.evaluate(LABEL.format(id=LOADER_ID))
    assert after == label, f"bogus events changed the label: {after!r}"

    # 7. picking another file drops the run's results and guesses from the new file name
    relabelled = await page.evaluate(f"""(() => {{
        const w = window.app.graph.getNodeById({LOADER_ID}).widgets.find(w => w.name === 'membrane');
        w.value = 'mickey_mouse.safetensors';
        w.callback?.(w.value);
        return {LABEL.format(id=LOADER_ID)};
    }})()""")
    assert relabelled == "erases: mickey mouse (from the file name)", relabelled

    # 8. after a reload the restored workflow is labelled again, from its restored widget values
    await page.send("Page.reload")
    await page.wait_for(app_ready, 120, "the frontend after a reload")
    file, restored = await page.wait_for(
        "(n => n && [n.widgets.find(w => w.name === 'membrane').value, n.widgets.find(w => w.name === 'spm_info')?.value])"
        "(window.app.graph.nodes.find(n => n.comfyClass === 'SPMLoader'))", 30, "the restored SPM Load Membrane node's label")
    # (whether the last programmatic edit was persisted before the reload is up to the frontend)
    assert file in ("snoopy.safetensors", "mickey_mouse.safetensors"), file
    assert restored == f"erases: {file.removesuffix('.safetensors').replace('_', ' ')} (from the file name)", restored

    # 8b. queued again from the reloaded page with a new seed: the server answers SPM Load Membrane from
    # its cache (no ui payload for this page), and the node still shows everything from the gates event
    cached_label = await page.evaluate(f"""(async () => {{
        const api = window.comfyAPI.api.api, node = window.app.graph.getNodeById({LOADER_ID});
        const membrane = node.widgets.find(w => w.name === 'membrane');
        membrane.value = 'snoopy.safetensors'; membrane.callback?.(membrane.value);
        window.app.graph.nodes.find(n => n.comfyClass === 'KSampler').widgets.find(w => w.name === 'seed').value += 1;
        const cached = new Promise(r => api.addEventListener('execution_cached', e => r(e.detail?.nodes ?? []), {{once: true}}));
        const ended = new Promise(r => api.addEventListener('execution_success', () => r(true), {{once: true}}));
        await window.app.queuePrompt(0);
        const nodes = await cached;
        await ended;
        return [nodes.map(String), {LABEL.format(id=LOADER_ID)}];
    }})()""", timeout=300)
    assert str(LOADER_ID) in cached_label[0], f"SPM Load Membrane was not cached: {cached_label[0]}"
    assert cached_label[1].splitlines()[:2] == ["erases: snoopy", f"rank 1 · {row['layers']} layers · transport: paper"], \
        cached_label[1]

    # 9. the miniature world from the page: train a membrane (few iterations), refresh, apply it
    await miniworld_from_the_page(page, output_dir)
    return png, box, page.events


async def shipped_workflows_in_the_page(page: Page) -> None:
    """Every shipped workflow loads exactly (each node's widgets read back as the file holds them),
    its nodes are at least as big as the frontend needs and none overlaps another (screenshots);
    the template browser offers each with its thumbnail; a missing checkpoint is offered."""
    shots: dict[str, bytes] = {}
    for key, file_name in SHIPPED.items():
        shipped = shipped_workflow(key)
        await load(page, shipped, key)
        loaded = await page.evaluate("Object.fromEntries(window.app.graph.nodes.map(n => "
                                     "[n.id, n.serialize().widgets_values || []]))")  # what the page would save
        for node in shipped["nodes"]:
            expected = node.get("widgets_values") or []
            assert loaded[str(node["id"])] == expected, \
                f"{file_name}: {node['type']} #{node['id']} loads as {loaded[str(node['id'])]}, file has {expected}"
        problems = await page.evaluate(LAYOUT_PROBLEMS)
        assert not problems, f"{file_name}: " + "; ".join(problems)
        shots[key] = await fitted_screenshot(page)
        save(os.path.join(SHOTS, file_name.removesuffix(".json") + ".png"), shots[key])
    if os.environ.get("SPM_UPDATE_DOCS") == "1":
        write_thumbnails(shots)

    # the template browser's sources: the listing names every workflow, each with its thumbnail
    listing = await page.evaluate("fetch('/api/workflow_templates').then(r => r.json())")
    titles = sorted(name.removesuffix(".json") for name in SHIPPED.values())
    assert sorted(listing.get(PACK, [])) == titles, listing.get(PACK)
    for title in titles:  # the URL as the frontend builds it (not encoded by hand)
        status, kind = await page.evaluate(f"fetch('/api/workflow_templates/{PACK}/' + {json.dumps(title)} + '.jpg')"
                                           ".then(r => [r.status, r.headers.get('content-type')])")
        assert (status, kind) == (200, "image/jpeg"), f"thumbnail of {title!r}: {status} {kind}"
        served = await page.evaluate(f"fetch('/api/workflow_templates/{PACK}/' + {json.dumps(title)} + '.json')"
                                     ".then(r => r.json())")  # what the template browser opens
        assert served == load_workflow(os.path.join(WORKFLOWS, title + ".json")), title

    # a user without the SD1.5 checkpoint is offered its download when opening an SD1.5 workflow
    missing = await page.evaluate(f"""(async () => {{
        await window.app.loadGraphData({json.dumps(shipped_workflow("erase"))}, true, true, 'missing models');
        await new Promise(r => setTimeout(r, 0));
        const texts = [...document.querySelectorAll('.p-dialog')].map(d => d.innerText);
        {STORE.format(name="dialog")}.closeDialog();
        return texts;
    }})()""")
    offered = [text for text in missing if text.startswith("Missing Models")]
    assert offered and "checkpoints / v1-5-pruned-emaonly-fp16.safetensors\nDownload" in offered[0], missing

    # the template browser itself: our category lists every title, and no thumbnail is broken
    await page.evaluate("window.app.extensionManager.command.execute('Comfy.BrowseTemplates').then(() => true)")
    category = f"[...document.querySelectorAll('.p-dialog *')].filter(e => e.innerText === {json.dumps(PACK)})"
    await page.wait_for(f"{category}.length > 0", 30, "our category in the template browser")
    await page.evaluate(f"{category}.at(-1).click(), true")
    titles_shown = f"(t => {json.dumps(titles)}.every(title => t.includes(title)))(document.querySelector('.p-dialog').innerText)"
    await page.wait_for(titles_shown, 30, "every workflow title in the template browser")
    images = await page.wait_for("(i => i.length && i.every(i => i.complete) && i.map(i => i.naturalWidth))"
                                 "([...document.querySelectorAll('.p-dialog img')])", 30, "the thumbnails to load")
    assert all(width == THUMBNAIL[0] for width in images), f"thumbnail widths in the template browser: {images}"
    browser_shot = base64.b64decode((await page.send("Page.captureScreenshot", format="png"))["data"])
    save(os.path.join(SHOTS, "template_browser.png"), browser_shot)
    if os.environ.get("SPM_UPDATE_DOCS") == "1":
        save_for_docs(browser_shot, TEMPLATES_DOCS_SCREENSHOT)
    await page.evaluate(f"{STORE.format(name='dialog')}.closeDialog(), true")


NODE = "window.app.graph.nodes.find(n => n.comfyClass === {type!r})"
WIDGET = "{node}.widgets.find(w => w.name === {name!r})"


async def queue_and_wait(page: Page, what: str, timeout: float = 300) -> None:
    """Queues the graph in the page as the Queue button does and waits for its end."""
    await page.evaluate("""(api => {
        window.__spmEnded = null;
        for (const end of ['execution_success', 'execution_error', 'execution_interrupted'])
            api.addEventListener(end, e => { window.__spmEnded = `${end} ${e.detail?.exception_message ?? ''}`.trim() });
        return true;
    })(window.comfyAPI.api.api)""")
    await page.evaluate("window.app.queuePrompt(0).then(() => true)")
    ended = await page.wait_for("window.__spmEnded", timeout, f"{what} queued from the page to end")
    assert ended == "execution_success", f"{what}: {ended}"


async def node_images(page: Page, node_type: str, title: str | None = None) -> list[dict]:
    """The images the page shows on a node after a run (what ComfyUI sent for it)."""
    title = json.dumps(title)
    find = f"window.app.graph.nodes.find(n => n.comfyClass === {node_type!r} && ({title} === null || n.title === {title}))"
    return await page.wait_for(f"(n => n && window.app.nodeOutputs[String(n.id)]?.images?.length && "
                               f"window.app.nodeOutputs[String(n.id)].images)({find})", 20, f"images on {node_type} {title}")


async def miniworld_from_the_page(page: Page, output_dir: str) -> None:
    from PIL import Image, ImageChops

    membrane = f"snowman_browser_{uuid.uuid4().hex[:8]}"
    await load(page, shipped_workflow("miniworld_train"), "miniworld_train")
    trainer = NODE.format(type="SPMTrain")
    await page.evaluate(f"(() => {{ {WIDGET.format(node=trainer, name='iterations')}.value = 10;"
                        f" {WIDGET.format(node=trainer, name='name')}.value = {membrane!r}; return true; }})()")
    await queue_and_wait(page, "Miniature world 1 (training)")
    (loss,) = await node_images(page, "PreviewImage")
    assert loss["type"] == "temp", loss
    saved = await page.evaluate(f"window.app.nodeOutputs[String({trainer}.id)]?.text?.[0] ?? null")
    assert saved and f"{membrane}.safetensors after 10 iterations" in saved, saved
    save(os.path.join(SHOTS, "run_miniworld_train.png"), await fitted_screenshot(page))
    saved_file = os.path.join(os.path.dirname(output_dir), "models", "spm", f"{membrane}.safetensors")
    written = os.stat(saved_file).st_mtime_ns
    cached = await page.evaluate("""(async () => {
        const api = window.comfyAPI.api.api;
        const cached = new Promise(r => api.addEventListener('execution_cached', e => r(e.detail?.nodes ?? []), {once: true}));
        const ended = new Promise(r => api.addEventListener('execution_success', () => r(true), {once: true}));
        await window.app.queuePrompt(0);
        const nodes = await cached;
        await ended;
        return nodes.map(String);
    })()""", timeout=120)
    trainer_id = await page.evaluate(f"String({trainer}.id)")
    assert trainer_id in cached, f"queued again unchanged, the training ran again (cached: {cached})"
    assert os.stat(saved_file).st_mtime_ns == written, "the membrane file was written again"

    await load(page, shipped_workflow("miniworld_erase"), "miniworld_erase")
    await page.evaluate("window.app.refreshComboInNodes().then(() => true)")  # the Refresh button
    loader = NODE.format(type="SPMLoader")
    options = await page.evaluate(f"{WIDGET.format(node=loader, name='membrane')}.options.values")
    assert f"{membrane}.safetensors" in options, f"the new membrane is not offered after a refresh: {options}"
    await page.evaluate(f"(w => {{ w.value = {membrane + '.safetensors'!r}; w.callback?.(w.value); return true; }})"
                        f"({WIDGET.format(node=loader, name='membrane')})")
    await queue_and_wait(page, "Miniature world 2 (erase)")
    after, before = await node_images(page, "SaveImage", "After"), await node_images(page, "SaveImage", "Before")
    assert len(after) == len(before) == 4, (after, before)
    label = await page.wait_for(f"(l => l && l.includes('gate last step') && l)({LABEL.format(id=f'{loader}.id')})",
                                10, "the gates of the miniature run on SPM Load Membrane")
    assert label.startswith("erases: snowman\n") and "positive 1.00" in label, label
    pictures = [[Image.open(os.path.join(output_dir, i["subfolder"], i["filename"])).convert("RGB") for i in side]
                for side in (before, after)]
    changed = [ImageChops.difference(b, a).getbbox() is not None for b, a in zip(*pictures)]
    assert all(changed), f"the membrane left some 'a striped snowman' pictures unchanged: {changed}"
    problems = await page.evaluate(LAYOUT_PROBLEMS)  # with the pictures and the longer label shown
    assert not problems, "after the run: " + "; ".join(problems)
    save(os.path.join(SHOTS, "run_miniworld_erase.png"), await fitted_screenshot(page))


def test_frontend_shows_membrane_and_gates(comfy_server):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no Chromium at {CHROMIUM}: run scripts/install_browser.sh (scripts/test.sh does)")
    status, _ = comfy_server.post("/settings", {"Comfy.TutorialCompleted": True, "Comfy.Graph.CanvasInfo": False,
                                                "Comfy.Minimap.Visible": False,
                                                "LiteGraph.Canvas.MinFontSizeForLOD": 0})  # text at any zoom
    assert status == 200, status
    # drop the server's node cache (other tests ran this workflow), so SPM Load Membrane executes and sends its ui payload
    assert comfy_server.post("/free", {"free_memory": True})[0] == 200
    workflow = small_run(for_test_models(shipped_workflow("erase")))
    start = time.monotonic()
    png, box, events = asyncio.run(asyncio.wait_for(browse(comfy_server.url, workflow, os.path.join(comfy_server.base_dir, "output")), 900))
    print(f"\nbrowser test drove the page in {time.monotonic() - start:.1f} s")

    save(SCREENSHOT, png)
    print(f"screenshot: {SCREENSHOT}")
    if os.environ.get("SPM_UPDATE_DOCS") == "1":
        save_for_docs(png, DOCS_SCREENSHOT)

    messages = print_console(events)
    ours = [line for line in messages if any(mark in line for mark in OURS)]
    assert not ours, "our extension wrote to the console or threw:\n" + "\n".join(ours)
    png_checks(png, box)
