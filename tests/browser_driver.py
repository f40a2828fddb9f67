"""Drives Debian Chromium (headless) over the DevTools protocol, for the browser tests.

`BrowserPage(url)` starts a Chromium with a fresh profile, opens the ComfyUI frontend at `url` and
offers synchronous calls on its page (`js`, `wait_for`, `send`), so that several tests can share one
page. Its event loop, DevTools connection and Chromium end with `close()`.

Chromium comes from scripts/install_browser.sh (called by scripts/test.sh).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import aiohttp

CHROMIUM = os.environ.get("SPM_CHROMIUM", "/usr/bin/chromium")
VIEWPORT = (1280, 800)
APP_READY = ("!!(window.app && window.app.graph && window.app.canvas && window.LiteGraph"
             " && window.LiteGraph.registered_node_types['SPMLoader'])")


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


class DevTools:
    """A DevTools session on one page target: commands, events, and JS evaluation (async)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[tuple[str, dict]] = []
        self._pending: dict[int, asyncio.Future] = {}
        self._next_id = 0
        self._reader = asyncio.create_task(self._read())

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
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value: {value!r}")


class BrowserPage:
    """One Chromium page on the ComfyUI frontend at `url`, driven synchronously.

    `init_script` runs in the page before the frontend's own scripts on every load (settings a
    returning user has in local storage, for instance)."""

    def __init__(self, url: str, init_script: str = "") -> None:
        self.url = url
        self.loop = asyncio.new_event_loop()
        self.browser = Chromium().__enter__()
        try:
            self.session = self._run(self._session())
            self.devtools = self._run(self._open())
            for domain in ("Runtime", "Log", "Page", "Network"):
                self.send(f"{domain}.enable")
            self.send("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0], height=VIEWPORT[1],
                      deviceScaleFactor=1, mobile=False)
            if init_script:
                self.send("Page.addScriptToEvaluateOnNewDocument", source=init_script)
            self.navigate()
        except BaseException:
            self.close()
            raise

    def _run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    async def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    async def _open(self) -> DevTools:
        async with self.session.get(f"http://127.0.0.1:{self.browser.port}/json/list") as response:
            targets = await response.json()
        page = next(t for t in targets if t["type"] == "page")
        return DevTools(await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0))

    @property
    def events(self) -> list[tuple[str, dict]]:
        return self.devtools.events

    def navigate(self, reload: bool = False) -> None:
        """Opens (or reloads) the frontend and waits until our node types are registered."""
        if reload:
            self.js("window.__spmBeforeReload = true")  # gone once the new document is there
            self.send("Page.reload")
        else:
            self.send("Page.navigate", url=self.url)
        self.wait_for(f"!window.__spmBeforeReload && {APP_READY}", 120, "the frontend to register the node types")

    def send(self, method: str, timeout: float = 60, **params) -> dict:
        return self._run(self.devtools.send(method, timeout, **params))

    def js(self, expression: str, timeout: float = 60):
        """The value of a JS expression in the page (promises awaited), as JSON."""
        return self._run(self.devtools.evaluate(expression, timeout))

    def wait_for(self, expression: str, timeout: float, what: str):
        return self._run(self.devtools.wait_for(expression, timeout, what))

    def screenshot(self, **clip) -> bytes:
        params = {"format": "png"}
        if clip:
            params["clip"] = {**clip, "scale": 1}
        return base64.b64decode(self.send("Page.captureScreenshot", **params)["data"])

    def close(self) -> None:
        devtools = getattr(self, "devtools", None)
        session = getattr(self, "session", None)

        async def shut() -> None:
            if devtools is not None:
                await devtools.ws.close()
                devtools._reader.cancel()
            if session is not None:
                await session.close()

        try:
            self._run(shut())
        finally:
            self.browser.__exit__()
            self.loop.close()


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
