"""The frontend in a real browser: Debian Chromium (headless, tests/browser_driver.py) opens the real
ComfyUI frontend, in four configurations: the frontend ComfyUI 0.3.75 pins and the newest
`comfyui-frontend-package` (scripts/frontend_newest.txt, served with --front-end-root), each with the
classic (canvas) node renderer and the Vue node renderer (setting `Comfy.VueNodes.Enabled`).

One server and one page per frontend, shared by the tests of that frontend:
- our extension (web/spm.js) is fetched and registered; a new SPM Train Membrane keeps its seed; the
  frontend's node search finds SPM Load Membrane by "erase", "concept", "membrane" and "SPM";
- every shipped workflow loads exactly (widget values as the file holds them), and with the classic
  renderer no node is smaller than the frontend needs and none overlaps another; the template
  browser lists each with its thumbnail, under a title it shows whole; an SD1.5 or Flux workflow opened
  without its checkpoint offers the download; SPM Load Membrane's help page (web/docs/SPMLoader.md)
  opens where the frontend shows node help;
- SPM Load Membrane's label (a DOM widget) is shown by both renderers and follows the node: what the
  file name says, "file not found" for a file the server does not list, the new file's concepts after
  picking another file, rank/transport/gates after a run queued from the page; events naming
  unknown nodes are ignored; the node is as tall as its content (no empty space under the label);
- after a reload the label comes back, and a run the server answers from its cache still shows the
  details (from the gates event) (newest frontend only: none of this depends on the frontend);
- the miniature world from the page: SPM Train Membrane trains while another open workflow, whose
  SPM Load Membrane has the same node id, is on screen (that node gets none of the progress text and
  says "file not found" for the membrane not written yet), queued again unchanged it does not
  retrain, a refresh offers the new membrane, and the erase workflow runs with it (pictures read
  back from the page, gates on the label; this run on the newest frontend only, to keep CI time);
  classic renderer on the pinned frontend, Vue nodes on the newest;
- nothing from our script reaches the console.

Screenshots are kept in out/browser/<frontend>-<renderer>/. SPM_UPDATE_DOCS=1 also writes the
workflows' thumbnails (workflows/<title>.jpg) and docs/images/browser_load_spm.png and
browser_templates.png for the README (from the pinned frontend, classic renderer).

Chromium and the newest frontend come from scripts/install_browser.sh (called by scripts/test.sh).
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
import uuid

import pytest
from browser_driver import CHROMIUM, VIEWPORT, BrowserPage, describe_event

from lab.comfy_server import PACK_NAME as PACK
from lab.comfy_server import SHIPPED, WORKFLOWS, ComfyServer, for_test_models, load_workflow, shipped_workflow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTENSION = "comfyui_spm.membrane_info"
SCRIPT_URL = "/extensions/comfyui_spm/spm.js"
OURS = ("spm.js", "comfyui_spm", EXTENSION)
SHOTS = os.path.join(REPO, "out", "browser")
THUMBNAIL = (512, 320)
DOCS_SCREENSHOT = os.path.join(REPO, "docs", "images", "browser_load_spm.png")
TEMPLATES_DOCS_SCREENSHOT = os.path.join(REPO, "docs", "images", "browser_templates.png")
LOADER_ID = 6  # the SPM Load Membrane node of the erase workflow
SD15_CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
FLUX_CHECKPOINT = "flux1-dev-fp8.safetensors"


def newest_frontend() -> tuple[str, str]:
    """The pinned newest frontend's version and the static folder the server serves."""
    with open(os.path.join(REPO, "scripts", "frontend_newest.txt"), encoding="utf-8") as handle:
        version = [line.strip() for line in handle if line.strip() and not line.startswith("#")][-1]
    cache = os.environ.get("SPM_FRONTEND_CACHE", os.path.join(os.path.expanduser("~"), ".cache"))
    return version, os.path.join(cache, f"spm-frontend-{version}", "comfyui_frontend_package", "static")


# --- page expressions ---------------------------------------------------------------------------

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
# Vue nodes are DOM elements sized by their content (often taller than the graph's size): overlaps
# of their boxes on screen
VUE_OVERLAPS = """(() => {
    const boxes = [...document.querySelectorAll('[data-node-id]')].map(e => [e.dataset.nodeId, e.getBoundingClientRect()]);
    const problems = [];
    boxes.forEach(([a, p], i) => boxes.slice(i + 1).forEach(([b, q]) => {
        if (p.left < q.right - 1 && q.left < p.right - 1 && p.top < q.bottom - 1 && q.top < p.bottom - 1)
            problems.push(`#${a} overlaps #${b} on screen`);
    }));
    return problems;
})()"""
STORE = ("[...document.querySelectorAll('*')].find(e => e.__vue_app__)"  # one of the frontend's pinia stores
         ".__vue_app__.config.globalProperties.$pinia._s.get({name!r})")
NODE = "window.app.graph.nodes.find(n => n.comfyClass === {type!r})"
WIDGET = "{node}.widgets.find(w => w.name === {name!r})"
FRAMES = "await new Promise(r => requestAnimationFrame(r)); await new Promise(r => requestAnimationFrame(r));"
# What SPM Load Membrane `node` shows: the label widget's text, and the label as the page draws it
# (its element's text, whether it is displayed, not covered, and inside the node).
SHOWN_LABEL = """(async node => {
    FRAMES
    const widget = (node?.widgets ?? []).find(w => w.name === 'spm_info');
    const element = widget?.element;
    if (!element)  // drawn on the canvas only (or no label at all)
        return {value: widget?.value ?? null, text: null, displayed: false, renderer: document.querySelector(
                `[data-node-id="${node?.id}"]`) ? 'vue' : 'classic'};
    const r = element.getBoundingClientRect(), x = (r.left + r.right) / 2, y = r.top + Math.min(8, r.height / 2);
    const events = element.style.pointerEvents;  // the label lets the pointer through to the canvas
    element.style.pointerEvents = 'auto';
    const top = document.elementFromPoint(x, y);
    element.style.pointerEvents = events;
    const vue = document.querySelector(`[data-node-id="${node.id}"]`);
    let inside, below = null;
    if (vue) {
        const n = vue.getBoundingClientRect();
        inside = r.left >= n.left - 1 && r.right <= n.right + 1 && r.top >= n.top - 1 && r.bottom <= n.bottom + 1;
    } else {
        const canvas = window.app.canvas, c = canvas.canvas.getBoundingClientRect();
        const [x0, y0] = canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1]]);
        const [x1, y1] = canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0], node.pos[1] + node.size[1]]);
        inside = r.left >= c.left + x0 - 1 && r.right <= c.left + x1 + 1 && r.top >= c.top + y0 - 1 && r.bottom <= c.top + y1 + 1;
        below = (c.top + y1 - r.bottom) / canvas.ds.scale;
    }
    return {value: widget.value, text: element.innerText, displayed: element.checkVisibility() && r.height > 0,
            onTop: !!top && element.contains(top) || top === element, inside, below, renderer: vue ? 'vue' : 'classic',
            box: {x0: r.left, y0: r.top, x1: r.right, y1: r.bottom}};
})""".replace("FRAMES", FRAMES)


def shown_label(page: BrowserPage, node: str = f"window.app.graph.getNodeById({LOADER_ID})") -> dict:
    return page.js(f"{SHOWN_LABEL}({node})")


def label_with(page: BrowserPage, node: str, part: str, what: str, timeout: float = 10) -> dict:
    """Waits until the label of SPM Load Membrane `node` shows `part`."""
    return page.wait_for(f"(async () => (l => l.text?.includes({part!r}) && l)(await {SHOWN_LABEL}({node})))()",
                         timeout, what)


def focus(page: BrowserPage, node_id: int) -> None:
    """100 % zoom with node `node_id` in view, right of the side bar and below the Run button."""
    page.js(f"""(async () => {{
        const app = window.app, node = app.graph.getNodeById({node_id});
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [-node.pos[0] + 480, -node.pos[1] + 190];
        app.canvas.setDirty(true, true);
        {FRAMES}
        return true;
    }})()""")


def save(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def save_for_docs(png: bytes, path: str) -> None:
    """The README's copy of a screenshot, as a small 256-colour PNG."""
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(path, optimize=True)


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
    # The label's area must hold text: light pixels on the dark node body. Text drawn off-screen,
    # or not drawn at all, fails here.
    crop = image.crop((round(box["x0"]), round(box["y0"]), round(box["x1"]), round(box["y1"]))).convert("L")
    bright = sum(1 for v in crop.tobytes() if v > 150)
    assert bright > 150, f"no text visible where the SPM label should be ({box}); {bright} light pixels"


def load(page: BrowserPage, workflow: dict, title: str) -> None:
    """As the template browser loads a workflow (a new tab named `title`), without the
    missing-models dialog (the SD1.5 checkpoint is not on the test server)."""
    page.js(f"window.app.loadGraphData({json.dumps(workflow)}, true, true, {json.dumps(title)},"
            " {showMissingModelsDialog: false}).then(() => true)")


def load_shipped(page: BrowserPage, key: str, workflow: dict | None = None) -> None:
    load(page, workflow or shipped_workflow(key), SHIPPED[key].removesuffix(".json"))


def fitted_screenshot(page: BrowserPage) -> bytes:
    """The whole graph in view (fit_view), as PNG bytes of that part of the window."""
    fit_view(page)
    return page.screenshot(x=60, y=40, width=1220, height=760)


def fit_view(page: BrowserPage) -> None:
    """The whole graph in view (like the frontend's fit view), below the tab bar and the Run
    button and right of the side bar."""
    page.js(f"""(async () => {{
        const app = window.app, title = window.LiteGraph.NODE_TITLE_HEIGHT, nodes = app.graph.nodes;
        const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - title));
        const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
        const rect = app.canvas.canvas.getBoundingClientRect(), view = {{left: 80, top: 100, right: 1260, bottom: 780}};
        const width = view.right - view.left, height = view.bottom - view.top;
        const scale = Math.min(1, width / (x1 - x0), height / (y1 - y0));
        app.canvas.ds.scale = scale;
        app.canvas.ds.offset = [(view.left - rect.left + (width - (x1 - x0) * scale) / 2) / scale - x0,
                                (view.top - rect.top + (height - (y1 - y0) * scale) / 2) / scale - y0];
        app.canvas.setDirty(true, true);
        {FRAMES} {FRAMES}
        return true;
    }})()""")


def queue_and_wait(page: BrowserPage, what: str, timeout: float = 300) -> None:
    """Queues the graph in the page as the Run button does and waits for its end."""
    page.js("""(api => {
        window.__spmEnded = null;
        for (const end of ['execution_success', 'execution_error', 'execution_interrupted'])
            api.addEventListener(end, e => { window.__spmEnded = `${end} ${e.detail?.exception_message ?? ''}`.trim() },
                                 {once: true});
        return true;
    })(window.comfyAPI.api.api)""")
    page.js("window.app.queuePrompt(0).then(() => true)")
    ended = page.wait_for("window.__spmEnded", timeout, f"{what} queued from the page to end")
    assert ended == "execution_success", f"{what}: {ended}"


def queue_cached(page: BrowserPage, timeout: float = 300) -> list[str]:
    """Queues the graph and returns the ids the server answered from its cache."""
    return page.js("""(async () => {
        const api = window.comfyAPI.api.api;
        const cached = new Promise(r => api.addEventListener('execution_cached', e => r(e.detail?.nodes ?? []), {once: true}));
        const ended = new Promise(r => api.addEventListener('execution_success', () => r(true), {once: true}));
        await window.app.queuePrompt(0);
        const nodes = await cached;
        await ended;
        return nodes.map(String);
    })()""", timeout=timeout)


def node_images(page: BrowserPage, node_type: str, title: str | None = None) -> list[dict]:
    """The images the page shows on a node after a run (what ComfyUI sent for it)."""
    title = json.dumps(title)
    find = f"window.app.graph.nodes.find(n => n.comfyClass === {node_type!r} && ({title} === null || n.title === {title}))"
    # (as JSON: newer frontends keep them in reactive proxies, which do not come back by value)
    return page.wait_for(f"(n => n && window.app.nodeOutputs[String(n.id)]?.images?.length && "
                         f"JSON.parse(JSON.stringify(window.app.nodeOutputs[String(n.id)].images)))({find})",
                         20, f"images on {node_type} {title}")


def pick(page: BrowserPage, node: str, file: str) -> None:
    """Picks `file` in SPM Load Membrane's membrane combo, as a click in its list does."""
    page.js(f"(w => {{ w.value = {file!r}; w.callback?.(w.value); return true; }})({WIDGET.format(node=node, name='membrane')})")


# --- fixtures ---------------------------------------------------------------------------------

SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Graph.CanvasInfo": False, "Comfy.Minimap.Visible": False,
            "LiteGraph.Canvas.MinFontSizeForLOD": 0,  # text at any zoom
            "Comfy.VueNodes.Enabled": False}
# a returning user: no first-run templates dialog, no "try Nodes 2.0" banner
RETURNING_USER = "localStorage.setItem('vueNodesBannerDismissed', 'true')"


class Frontend:
    def __init__(self, name: str, server: ComfyServer, page: BrowserPage) -> None:
        self.name, self.server, self.page = name, server, page

    def shots(self, renderer: str) -> str:
        return os.path.join(SHOTS, f"{self.name}-{renderer}")


class Booting:
    """A ComfyServer started in a thread, so that it boots while other tests run."""

    def __init__(self, server: ComfyServer) -> None:
        self.server, self.error = server, None
        self.thread = threading.Thread(target=self._boot, daemon=True)
        self.thread.start()

    def _boot(self) -> None:
        try:
            self.server.__enter__()
        except BaseException as error:  # handed to the test that needs the server
            self.error = error

    def ready(self) -> ComfyServer:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.server

    def stop(self) -> None:
        self.thread.join()
        if self.error is None:
            self.server.__exit__()


@pytest.fixture(scope="module", autouse=True)
def newest_server(request, tmp_path_factory):
    """The newest frontend's server (its own base directory), booting from the start of the module
    when any of its tests is selected; None otherwise."""
    wanted = any(item.module is request.module and getattr(item, "callspec", None) is not None
                 and item.callspec.params.get("frontend") == "newest" for item in request.session.items)
    _, static = newest_frontend()
    if not wanted or not os.path.isfile(os.path.join(static, "index.html")):
        yield None
        return
    from conftest import COMFYUI_ROOT
    from membrane_helpers import write_broken_membranes

    from lab.tiny_assets import install_assets

    base = tmp_path_factory.mktemp("comfy_base_newest")
    install_assets(str(base / "models"))
    write_broken_membranes(str(base / "models" / "spm"))
    booting = Booting(ComfyServer(COMFYUI_ROOT, str(base), front_end_root=static))
    try:
        yield booting
    finally:
        booting.stop()


@pytest.fixture(scope="module", params=["pinned", "newest"])
def frontend(request, newest_server):
    """The server and a page on it, for the pinned frontend and for the newest one."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no Chromium at {CHROMIUM}: run scripts/install_browser.sh (scripts/test.sh does)")
    if request.param == "pinned":
        yield from _frontend("pinned", request.getfixturevalue("comfy_server"))
        return
    version, static = newest_frontend()
    if newest_server is None:
        pytest.fail(f"no comfyui-frontend-package {version} at {static}: run scripts/install_browser.sh")
    yield from _frontend(f"newest-{version}", newest_server.ready())


def _frontend(name: str, server: ComfyServer):
    status, _ = server.post("/settings", SETTINGS)
    assert status == 200, status
    page = BrowserPage(server.url, RETURNING_USER)
    try:
        yield Frontend(name, server, page)
    finally:
        page.close()


@pytest.fixture
def page(frontend, request):
    """The frontend's page; when the test fails, a screenshot of it and its console are kept."""
    failed = request.session.testsfailed
    yield frontend.page
    if request.session.testsfailed > failed:
        path = os.path.join(SHOTS, f"failed-{request.node.name}.png".replace("/", "_"))
        try:
            save(path, frontend.page.screenshot())
            print(f"\nscreenshot of the failure: {path}")
        except Exception as error:  # the page may be what failed
            print(f"\nno screenshot of the failure: {error}")
        print_console(frontend.page.events)


def use_renderer(page: BrowserPage, renderer: str) -> None:
    """Switches the node renderer as the setting does (the graph on screen is redrawn)."""
    vue = renderer == "vue"
    page.js(f"window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', {json.dumps(vue)}).then(() => true)")
    page.wait_for(f"window.app.extensionManager.setting.get('Comfy.VueNodes.Enabled') === {json.dumps(vue)}", 10,
                  f"the {renderer} renderer")


def rendered_by(page: BrowserPage, renderer: str) -> None:
    """Waits until the graph on screen is drawn by `renderer` (Vue nodes are DOM elements)."""
    vue = "document.querySelectorAll('[data-node-id]').length"
    page.wait_for(f"{vue} > 0" if renderer == "vue" else f"{vue} === 0", 20, f"the nodes drawn by the {renderer} renderer")


def print_console(events: list[tuple[str, dict]]) -> list[str]:
    messages = [line for line in (describe_event(m, p) for m, p in events) if line]
    print("\nbrowser console, for the record:", *messages, sep="\n  ")
    return messages


RENDERERS = pytest.mark.parametrize("renderer", ["classic", "vue"])


# --- tests ---------------------------------------------------------------------------------------

def test_extension_loads_and_is_found(page):
    names = page.js("window.app.extensions.map(e => e.name)")
    assert EXTENSION in names, f"extension {EXTENSION} not registered; have {len(names)}: {names}"
    fetched = [p["response"] for m, p in page.events if m == "Network.responseReceived" and p["response"]["url"].endswith(SCRIPT_URL)]
    assert fetched and fetched[-1]["status"] == 200, f"{SCRIPT_URL} was not fetched: {fetched}"

    # an SPM Train Membrane added by hand keeps its seed ("randomize" would retrain on every queue)
    control = page.js("(() => { const n = window.LiteGraph.createNode('SPMTrain'); window.app.graph.add(n);"
                      " const v = n.widgets.find(w => w.name === 'seed').linkedWidgets[0].value;"
                      " window.app.graph.remove(n); return v; })()")
    assert control == "fixed", f"a new SPM Train Membrane's seed control is {control!r}"

    # the frontend's own node search finds the loader by the words users type
    search = STORE.format(name="nodeDef") + ".nodeSearchService"
    found = page.js(f"Object.fromEntries(['erase', 'concept', 'membrane', 'SPM'].map(q => "
                    f"[q, {search}.searchNode(q).slice(0, 3).map(n => n.name)]))")
    for query, names in found.items():
        assert "SPMLoader" in names, f"searching {query!r} shows {names}, not SPM Load Membrane"


@RENDERERS
def test_shipped_workflows_load_exactly(frontend, page, renderer):
    """Each shipped workflow's widgets read back as the file holds them (the label is in none of
    them); nodes are as big as the classic renderer needs, and none overlaps in either renderer."""
    use_renderer(page, renderer)
    shots: dict[str, bytes] = {}
    for key, file_name in SHIPPED.items():
        shipped = shipped_workflow(key)
        load_shipped(page, key, shipped)
        rendered_by(page, renderer)
        loaded = page.js("Object.fromEntries(window.app.graph.nodes.map(n => "
                         "[n.id, n.serialize().widgets_values || []]))")  # what the page would save
        for node in shipped["nodes"]:
            expected = node.get("widgets_values") or []
            assert loaded[str(node["id"])] == expected, \
                f"{file_name}: {node['type']} #{node['id']} loads as {loaded[str(node['id'])]}, file has {expected}"
        prompt = page.js("window.app.graphToPrompt().then(p => Object.fromEntries(Object.entries(p.output)"
                         ".map(([id, n]) => [id, Object.keys(n.inputs)])))")  # what the page would queue
        for node_id, inputs in prompt.items():
            assert "spm_info" not in inputs, f"{file_name}: the label is sent as an input of #{node_id}"
        problems = page.js(LAYOUT_PROBLEMS if renderer == "classic" else VUE_OVERLAPS)
        assert not problems, f"{file_name} ({renderer}): " + "; ".join(problems)
        if renderer == "classic":  # (the screenshots of the Vue renderer are left out, to keep CI time)
            shots[key] = fitted_screenshot(page)
            save(os.path.join(frontend.shots(renderer), file_name.removesuffix(".json") + ".png"), shots[key])
        else:
            fit_view(page)
        for loader in [n["id"] for n in shipped["nodes"] if n["type"] == "SPMLoader"]:
            shown = shown_label(page, f"window.app.graph.getNodeById({loader})")
            assert shown["text"] and shown["displayed"], f"{file_name}: SPM Load Membrane #{loader} shows {shown}"
    if os.environ.get("SPM_UPDATE_DOCS") == "1" and frontend.name == "pinned" and renderer == "classic":
        from PIL import Image

        for key, png in shots.items():  # what the template browser shows for each workflow
            image = Image.open(io.BytesIO(png)).convert("RGB").resize(THUMBNAIL, Image.LANCZOS)
            image.save(os.path.join(WORKFLOWS, SHIPPED[key].removesuffix(".json") + ".jpg"), quality=80, optimize=True)


def test_template_browser(frontend, page):
    """The template browser's sources name every workflow with its thumbnail; the browser itself
    lists our category with every title shown whole and every thumbnail loaded."""
    listing = page.js("fetch('/api/workflow_templates').then(r => r.json())")
    titles = sorted(name.removesuffix(".json") for name in SHIPPED.values())
    assert sorted(listing.get(PACK, [])) == titles, listing.get(PACK)
    for title in titles:  # the URL as the frontend builds it (not encoded by hand)
        status, kind = page.js(f"fetch('/api/workflow_templates/{PACK}/' + {json.dumps(title)} + '.jpg')"
                               ".then(r => [r.status, r.headers.get('content-type')])")
        assert (status, kind) == (200, "image/jpeg"), f"thumbnail of {title!r}: {status} {kind}"
        served = page.js(f"fetch('/api/workflow_templates/{PACK}/' + {json.dumps(title)} + '.json')"
                         ".then(r => r.json())")  # what the template browser opens
        assert served == load_workflow(os.path.join(WORKFLOWS, title + ".json")), title

    page.js("window.app.extensionManager.command.execute('Comfy.BrowseTemplates').then(() => true)")
    dialog = "[...document.querySelectorAll('.p-dialog, [role=dialog]')].at(-1)"
    category = f"[...{dialog}.querySelectorAll('*')].filter(e => e.innerText === {json.dumps(PACK)})"
    page.wait_for(f"{category}.length > 0", 30, "our category in the template browser")
    page.js(f"{category}.at(-1).click(), true")
    # every title is shown, and shown whole: the element holding it is not cut (no ellipsis)
    cards = f"""(d => {json.dumps(titles)}.map(title => {{
        const e = [...d.querySelectorAll('*')].filter(e => e.childElementCount === 0 && e.textContent.trim() === title)[0];
        return e ? [title, e.scrollWidth <= e.clientWidth + 1 && e.scrollHeight <= e.clientHeight + 1] : null;
    }}))({dialog})"""
    shown = page.wait_for(f"(c => c.every(x => x) && c)({cards})", 30, "every workflow title in the template browser")
    cut = [title for title, whole in shown if not whole]
    assert not cut, f"the template browser cuts these titles: {cut}"
    images = page.wait_for(f"(i => i.length && i.every(i => i.complete) && i.map(i => i.naturalWidth))"
                           f"([...{dialog}.querySelectorAll('img')])", 30, "the thumbnails to load")
    assert all(width == THUMBNAIL[0] for width in images), f"thumbnail widths in the template browser: {images}"
    browser_shot = page.screenshot()
    save(os.path.join(frontend.shots("classic"), "template_browser.png"), browser_shot)
    if os.environ.get("SPM_UPDATE_DOCS") == "1" and frontend.name == "pinned":
        save_for_docs(browser_shot, TEMPLATES_DOCS_SCREENSHOT)
    page.js(f"{STORE.format(name='dialog')}.closeDialog(), true")


@pytest.mark.parametrize("key, checkpoint", [("erase", SD15_CHECKPOINT), ("erase_flux", FLUX_CHECKPOINT)])
def test_missing_checkpoint_is_offered(page, key, checkpoint):
    """A user without the SD1.5 (Flux.1-dev) checkpoint is offered its download when opening an SD1.5 (Flux)
    workflow."""
    page.js(f"window.app.loadGraphData({json.dumps(shipped_workflow(key))}, true, true, 'missing models').then(() => true)")
    # the pinned frontend opens a Missing Models dialog; newer ones list the model in a panel
    offered = page.wait_for(f"""(() => {{
        const dialogs = [...document.querySelectorAll('.p-dialog')].map(d => d.innerText).filter(t => t.startsWith('Missing Models'));
        if (dialogs.length) return dialogs[0].includes('checkpoints / {checkpoint}\\nDownload') && 'dialog';
        const store = {STORE.format(name="missingModel")};
        const model = store?.missingModelCandidates?.find(m => m.name === '{checkpoint}');
        return model?.url?.startsWith('https://') && document.body.innerText.includes('{checkpoint} is missing') && 'panel';
    }})()""", 30, "the missing checkpoint to be offered")
    assert offered in ("dialog", "panel"), offered
    page.js(f"{STORE.format(name='dialog')}.closeDialog(), true")


def test_help_page_is_ours(page):
    """SPM Load Membrane's help (web/docs/SPMLoader.md) opens where the frontend shows node help:
    the node library's help page (pinned), the right side panel's Info tab (newer frontends)."""
    with open(os.path.join(REPO, "web", "docs", "SPMLoader.md"), encoding="utf-8") as handle:
        paragraph = handle.read().split("\n\n")[1]
    words = " ".join(re.sub(r"[*_`]", "", paragraph).split()[:6])  # as the rendered page reads
    load_shipped(page, "erase", for_test_models(shipped_workflow("erase")))
    where = page.js(f"""(async () => {{
        const app = window.app, help = {STORE.format(name="nodeHelp")}, panel = {STORE.format(name="rightSidePanel")};
        if (help) {{
            await app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library');
            help.openHelp({STORE.format(name="nodeDef")}.nodeDefsByName['SPMLoader']);
            return 'node library';
        }}
        app.canvas.selectNode(app.graph.getNodeById({LOADER_ID}));
        panel.openPanel('info');
        return 'side panel';
    }})()""")
    page.wait_for(f"document.body.innerText.includes({words!r})", 20, f"the help page in the {where}")
    served = [p["response"]["status"] for m, p in page.events if m == "Network.responseReceived"
              and p["response"]["url"].endswith("/extensions/comfyui_spm/docs/SPMLoader.md")]
    assert served and served[-1] == 200, f"web/docs/SPMLoader.md was not served: {served}"
    page.js(f"""(async () => {{
        const help = {STORE.format(name="nodeHelp")}, panel = {STORE.format(name="rightSidePanel")};
        if (help) {{ help.closeHelp(); await window.app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library'); }}
        else panel.closePanel();
        return true;
    }})()""")


@RENDERERS
def test_load_label_follows_the_file_and_the_run(frontend, page, renderer):
    use_renderer(page, renderer)
    load_shipped(page, "erase", small_run(for_test_models(shipped_workflow("erase"))))
    rendered_by(page, renderer)
    focus(page, LOADER_ID)
    node = loader = f"window.app.graph.getNodeById({LOADER_ID})"

    def label() -> dict:
        shown = shown_label(page, node)
        assert shown["renderer"] == renderer, shown
        assert shown["displayed"] and shown["onTop"] and shown["inside"], f"the label is not shown on the node: {shown}"
        assert shown["text"] == shown["value"], shown
        return shown

    assert label()["text"] == "erases: snoopy (from the file name)"
    if renderer == "classic":  # as tall as its content: no empty space under the label
        gap = page.js(f"(n => n.size[1] - n.computeSize()[1])({node})")
        assert abs(gap) < 1, f"SPM Load Membrane is {gap} px taller than its widgets and label"
        below = shown_label(page, node)["below"]
        assert below < 16, f"{below} px of empty space under the label"

    # a file the server does not list: no guess from its name
    pick(page, loader, "gone_snowman.safetensors")
    assert label()["text"] == "file not found"
    # another file: the label follows it
    pick(page, loader, "mickey_mouse.safetensors")
    assert label()["text"] == "erases: mickey mouse (from the file name)"

    # a run queued from the page: the ui payload and the spm.gates event reach the node
    page.js("""(api => {
        window.__spmGates = null;
        api.addEventListener('spm.gates', e => { window.__spmGates = e.detail }, {once: true});
        return true;
    })(window.comfyAPI.api.api)""")
    queue_and_wait(page, "the erase workflow")
    shown = label_with(page, node, "gate last step", "the gates of the run to reach the SPM Load Membrane label")
    gates = page.js("window.__spmGates")
    row = next(r for r in gates["membranes"] if str(r["node"]) == str(LOADER_ID))
    assert row["concepts"] == ["mickey mouse"], row
    label()
    assert shown["text"].splitlines() == [
        "erases: mickey mouse",
        f"rank 1 · {row['layers']} layers · transport: paper",
        f"gate last step: positive {row['positive']:.2f} · negative {row['negative']:.2f}",
    ], shown["text"]
    if renderer == "classic":
        gap = page.js(f"(n => n.size[1] - n.computeSize()[1])({node})")
        assert abs(gap) < 1, f"after the run SPM Load Membrane is {gap} px off its content"
        problems = page.js(LAYOUT_PROBLEMS)
        assert not problems, "after the run: " + "; ".join(problems)

    # events with no data or naming nodes that are not in the graph change nothing
    page.js("""(() => {
        const api = window.comfyAPI.api.api;
        for (const detail of [null, {}, {membranes: null}, {membranes: [null, {}, {node: '999'}, {node: '1'}, {node: '999:6'}]}])
            api.dispatchCustomEvent('spm.gates', detail);
        return true;
    })()""")
    assert label()["text"] == shown["text"], "bogus events changed the label"

    focus(page, LOADER_ID)
    shown = label()
    png = page.screenshot()
    save(os.path.join(frontend.shots(renderer), "load_spm.png"), png)
    png_checks(png, shown["box"])
    if os.environ.get("SPM_UPDATE_DOCS") == "1" and frontend.name == "pinned" and renderer == "classic":
        save_for_docs(png, DOCS_SCREENSHOT)


@pytest.mark.parametrize("frontend", ["newest"], indirect=True)  # frontend-independent code: once, to keep CI time
def test_label_after_reload_and_cached_run(page):
    """After a reload the restored workflow is labelled again; queued, the server answers SPM Load
    Membrane from its cache (no ui payload) and the gates event still brings its details."""
    workflow = small_run(for_test_models(shipped_workflow("erase")))
    loader = next(n for n in workflow["nodes"] if n["id"] == LOADER_ID)
    loader["widgets_values"][0] = "mickey_mouse.safetensors"  # as the label test ran it: cached on the server
    load_shipped(page, "erase", workflow)
    page.navigate(reload=True)
    node = page.wait_for("(n => n && n.widgets.find(w => w.name === 'spm_info')?.value && n.id)"
                         "(window.app.graph.nodes.find(n => n.comfyClass === 'SPMLoader'))", 30,
                         "the restored SPM Load Membrane node's label")
    node = f"window.app.graph.getNodeById({json.dumps(node)})"
    shown = shown_label(page, node)
    assert shown["displayed"] and shown["text"] == "erases: mickey mouse (from the file name)", shown

    for _ in range(2):  # the second of two identical loaders is always cached (the first too after the label test)
        page.js(f"{WIDGET.format(node=NODE.format(type='KSampler'), name='seed')}.value += 1, true")
        cached = queue_cached(page)
        if str(LOADER_ID) in cached:
            break
    assert str(LOADER_ID) in cached, f"SPM Load Membrane was not cached: {cached}"
    shown = label_with(page, node, "gate last step", "the gates of the cached run on the SPM Load Membrane label")
    lines = shown["text"].splitlines()
    assert lines[0] == "erases: mickey mouse" and re.fullmatch(r"rank 1 · \d+ layers · transport: paper", lines[1]), lines


def test_miniature_world_from_the_page(frontend, page):
    """Train in one workflow while another is on screen, then erase with the new membrane."""
    from PIL import Image, ImageChops

    renderer = "vue" if frontend.name != "pinned" else "classic"  # the pinned classic page is the historical one
    use_renderer(page, renderer)
    membrane = f"snowman_browser_{uuid.uuid4().hex[:8]}"
    train = shipped_workflow("miniworld_train")
    trainer_node = next(n for n in train["nodes"] if n["type"] == "SPMTrain")
    erase = shipped_workflow("miniworld_erase")
    for node in erase["nodes"]:
        if node["type"] == "KSampler":
            node["widgets_values"][2] = 8  # steps: enough for the membrane to show, quicker on a CPU
    loader_id = next(n["id"] for n in erase["nodes"] if n["type"] == "SPMLoader")
    assert loader_id == trainer_node["id"], "the test needs the two workflows to share the node id"
    load_shipped(page, "miniworld_erase", erase)
    erase_graph = page.js("window.app.graph.id")
    load_shipped(page, "miniworld_train", train)
    train_graph = page.js("window.app.graph.id")
    rendered_by(page, renderer)
    trainer = NODE.format(type="SPMTrain")
    page.js(f"(() => {{ {WIDGET.format(node=trainer, name='iterations')}.value = 3;"
            f" {WIDGET.format(node=trainer, name='name')}.value = {membrane!r}; return true; }})()")

    # queued from the training workflow; once its progress text shows on SPM Train Membrane, the
    # erase workflow is brought on screen while the training goes on
    page.js(f"""(async () => {{
        const api = window.comfyAPI.api.api, app = window.app;
        window.__spmTexts = [];
        window.__spmEnded = null;
        api.addEventListener('progress_text', e => window.__spmTexts.push([app.graph.id, e.detail?.nodeId, e.detail?.text]));
        for (const end of ['execution_success', 'execution_error', 'execution_interrupted'])
            api.addEventListener(end, e => {{ window.__spmEnded = `${{end}} ${{e.detail?.exception_message ?? ''}}`.trim() }},
                                 {{once: true}});
        const first = new Promise(r => api.addEventListener('progress_text', r, {{once: true}}));
        await app.queuePrompt(0);
        await first;
        window.__spmShownOnTrainer = app.graph.getNodeById({loader_id}).widgets.find(w => w.name === '$$node-text-preview')?.value;
        await app.extensionManager.command.execute('Workspace.PreviousOpenedWorkflow');
        return true;
    }})()""", timeout=300)
    assert page.js("window.app.graph.id") == erase_graph, "the erase workflow did not come on screen"
    ended = page.wait_for("window.__spmEnded", 300, "the training queued from the page to end")
    assert ended == "execution_success", ended
    on_trainer = page.js("window.__spmShownOnTrainer")
    assert on_trainer and on_trainer.startswith("1/3"), f"SPM Train Membrane showed {on_trainer!r} while on screen"
    seen = [text for graph, _, text in page.js("window.__spmTexts") if graph == train_graph]
    assert not any(text.startswith("3/3") for text in seen), \
        f"the training ended before the other workflow came on screen (nothing to check): {seen}"
    # the other workflow's SPM Load Membrane, same node id: none of the training's text on it
    texts = page.js(f"(n => n.widgets.filter(w => w.name !== 'spm_info').map(w => String(w.value)))"
                    f"(window.app.graph.getNodeById({loader_id}))")
    leaked = [t for t in texts if "loss" in t or "ETA" in t]
    assert not leaked, f"the training's progress text is on the erase workflow's SPM Load Membrane: {leaked}"
    loader = NODE.format(type="SPMLoader")
    shown = shown_label(page, loader)
    assert shown["displayed"] and shown["text"] == "file not found", \
        f"the snowman membrane is not on this server, yet the label says {shown['text']!r}"

    # the output of the training, read back from the server
    saved_file = os.path.join(frontend.server.base_dir, "models", "spm", f"{membrane}.safetensors")
    assert os.path.isfile(saved_file), f"the training wrote no {saved_file}"
    written = os.stat(saved_file).st_mtime_ns
    # queued again unchanged, the training is answered from the cache
    page.js("window.app.extensionManager.command.execute('Workspace.NextOpenedWorkflow').then(() => true)")
    assert page.js("window.app.graph.id") == train_graph
    cached = queue_cached(page, timeout=120)
    assert str(trainer_node["id"]) in cached, f"queued again unchanged, the training ran again (cached: {cached})"
    assert os.stat(saved_file).st_mtime_ns == written, "the membrane file was written again"
    (loss,) = node_images(page, "PreviewImage")
    assert loss["type"] == "temp", loss

    # the erase workflow: a refresh offers the new membrane, picked it runs with it
    page.js("window.app.extensionManager.command.execute('Workspace.PreviousOpenedWorkflow').then(() => true)")
    assert page.js("window.app.graph.id") == erase_graph
    page.js("window.app.refreshComboInNodes().then(() => true)")  # the Refresh button
    options = page.js(f"{WIDGET.format(node=loader, name='membrane')}.options.values")
    assert f"{membrane}.safetensors" in options, f"the new membrane is not offered after a refresh: {options}"
    pick(page, loader, f"{membrane}.safetensors")
    assert shown_label(page, loader)["text"] == f"erases: {membrane.replace('_', ' ')} (from the file name)"
    if frontend.name == "pinned":  # the erase run and its pictures once (newest frontend, Vue nodes): CI time
        return
    queue_and_wait(page, "Miniature world 2 (erase)")
    after, before = node_images(page, "SaveImage", "After"), node_images(page, "SaveImage", "Before")
    assert len(after) == len(before) == 4, (after, before)
    shown = label_with(page, loader, "gate last step", "the gates of the miniature run on SPM Load Membrane")
    assert shown["displayed"] and shown["text"].startswith("erases: snowman\n") and "positive 1.00" in shown["text"], shown
    output = os.path.join(frontend.server.base_dir, "output")
    pictures = [[Image.open(os.path.join(output, i["subfolder"], i["filename"])).convert("RGB") for i in side]
                for side in (before, after)]
    changed = [ImageChops.difference(b, a).getbbox() is not None for b, a in zip(*pictures)]
    assert all(changed), f"the membrane left some 'a striped snowman' pictures unchanged: {changed}"
    if renderer == "classic":
        problems = page.js(LAYOUT_PROBLEMS)  # with the pictures and the longer label shown
        assert not problems, "after the run: " + "; ".join(problems)
    save(os.path.join(frontend.shots(renderer), "run_miniworld_erase.png"), fitted_screenshot(page))


def test_nothing_of_ours_in_the_console(page):
    messages = print_console(page.events)
    # the frontend asks for a translated help page (docs/<node>/<locale>.md) before docs/<node>.md
    probes = re.compile(r"404 \(Not Found\) \[\S*/extensions/comfyui_spm/docs/\w+/[\w-]+\.md\]")
    ours = [line for line in messages if any(mark in line for mark in OURS) and not probes.search(line)]
    assert not ours, "our extension wrote to the console or threw:\n" + "\n".join(ours)
