"""End to end in a real browser: JupyterLab + Chromium + the notebook's sliders + a remote client.

Recipe (DESIGN.md, "Real browser works here"): JupyterLab started as a subprocess on
127.0.0.1 with a token, a temporary root folder holding the tutorial notebooks plus a small
notebook written for this test, and the setting ``notebook-extension/tracker
{"autoStartDefaultKernel": true}`` (a user-settings file in a temporary settings folder; the
Jupyter config, data, runtime and workspace folders are temporary too, so the user's own
JupyterLab state is neither read nor written). Playwright's sync
API drives Debian's ``/usr/bin/chromium`` headless.

The notebook starts a lab on a port and JWT secret the test chose, so the test process can join
the same session with a :class:`pluginlab.Client` (run on a private event loop in a thread:
Playwright's sync API must not run inside an asyncio loop). Then:

(a) arrow keys on the Wet/Dry slider handle change the engine's value (read back over the
    WebSocket with PLUGIN_PARAMETERS_GET);
(b) the client receives the PLUGIN_STATE_UPDATE of those moves, made by "notebook";
(c) a change and a cursor sent by the client move the Room Size slider and show "✎ colleague"
    in the page.

A second test runs the seed's old hook (plain JavaScript, old message format) in Chromium
next to a new-format client, and checks the old page's own plugin list follows their changes.

Skipped when Chromium or Playwright is missing, except under ``CI=true`` where it must run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from pluginlab.auth import AuthConfig, Authenticator
from pluginlab.client import Client

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SECRET = "pluginlab-browser-test-secret-0123456789abcdef"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
STEPS = 5  # arrow-key presses: wet_dry 0.30 -> 0.35 (step 0.01)
T = TypeVar("T")


def _require_browser() -> None:
    ci = os.environ.get("CI", "").lower() == "true"
    reasons = []
    if not CHROMIUM.exists():
        reasons.append(f"{CHROMIUM} is missing (Debian package: chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reasons.append("the playwright Python package is missing (pip install playwright)")
    if reasons:
        message = "; ".join(reasons)
        if ci:
            pytest.fail(f"browser test must run under CI=true: {message}")
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_notebook(path: Path, lab_port: int, data_dir: Path) -> None:
    """A small notebook: a lab on the test's port and secret (read from a JSON file beside the
    notebook, so the page shows what a researcher would write), a presence panel and sliders."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config = {"port": lab_port, "jwt_secret": SECRET, "db": str(data_dir / "lab.sqlite"),
              "presets_dir": str(data_dir / "presets")}
    path.with_suffix(".json").write_text(json.dumps(config))
    cells = [
        new_markdown_cell("# A Reverb, shared\nSliders bound to the lab in this kernel; "
                          "a colleague joins from another process."),
        new_code_cell(
            "import json\n"
            "import pluginlab\n"
            "from pluginlab import Source\n\n"
            f"lab = await pluginlab.start('browser', **json.load(open({path.with_suffix('.json').name!r})))\n"
            "lab.set_source('drums', Source.file('drum_loop.wav'))\n"
            "reverb = await lab.add_plugin('drums', 'Reverb', plugin_id='reverb')\n"
            "lab"),
        new_code_cell("presence = lab.presence_panel()\n"
                      "panel = lab.panel(reverb)\n"
                      "display(presence, panel)"),
    ]
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)",
                       "language": "python"}})
    nbformat.write(nb, path)


def _write_settings(settings: Path) -> None:
    values = {
        "@jupyterlab/notebook-extension/tracker": {"autoStartDefaultKernel": True},
        "@jupyterlab/apputils-extension/notification": {"fetchNews": "false",
                                                         "checkForUpdates": False},
    }
    for plugin, body in values.items():
        target = settings / f"{plugin}.jupyterlab-settings"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(body))


class Jupyter:
    """A JupyterLab server subprocess; :meth:`stop` shuts kernels and server down."""

    def __init__(self, tmp: Path, root: Path) -> None:
        self.port = _free_port()
        self.token = "browser-test-" + os.urandom(8).hex()
        self.base = f"http://127.0.0.1:{self.port}"
        settings, workspaces = tmp / "lab-settings", tmp / "lab-workspaces"
        _write_settings(settings)
        env = {**os.environ,
               "JUPYTER_CONFIG_DIR": str(tmp / "jupyter-config"),
               "JUPYTER_RUNTIME_DIR": str(tmp / "jupyter-runtime"),
               "JUPYTER_DATA_DIR": str(tmp / "jupyter-data"),  # kernelspecs: sys.prefix's
               "JUPYTERLAB_SETTINGS_DIR": str(settings),
               "JUPYTERLAB_WORKSPACES_DIR": str(workspaces),
               "JUPYTER_PLATFORM_DIRS": "1",
               "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
        self.log_path = tmp / "jupyterlab.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser",
             "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
             "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={root}", f"--LabApp.user_settings_dir={settings}",
             f"--LabApp.workspaces_dir={workspaces}", "--LabApp.news_url=",
             "--ServerApp.disable_check_xsrf=True",
             *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(root),
            start_new_session=True)

    def api(self, path: str, method: str = "GET") -> Any:
        request = urllib.request.Request(f"{self.base}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def wait_ready(self, timeout: float = 45.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}:\n"
                                   + self.log_path.read_text()[-3000:])
            try:
                self.api("/api/status")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        raise TimeoutError("JupyterLab did not start")

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    for kernel in self.api("/api/kernels"):
                        self.api(f"/api/kernels/{kernel['id']}", "DELETE")
                    self.api("/api/shutdown", "POST")
                except (OSError, ValueError) as exc:  # urllib errors are OSErrors
                    print("JupyterLab REST shutdown failed, terminating:", exc)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                    try:
                        self.proc.wait(10)
                    except subprocess.TimeoutExpired:
                        os.killpg(self.proc.pid, signal.SIGKILL)
                        self.proc.wait(5)
        finally:
            self.log.close()


class LoopThread:
    """An asyncio loop in a daemon thread, for the WebSocket client next to Playwright's sync API."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """The JupyterLab root (tutorial notebooks + the test's notebook) and the lab's port."""
    root = tmp_path / "root"
    shutil.copytree(ROOT / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    lab_port = _free_port()
    _write_notebook(root / "browser_check.ipynb", lab_port, tmp_path / "lab-data")
    yield root, lab_port


def _eventually(check: Any, timeout: float = 15.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def test_sliders_in_jupyterlab_talk_to_a_remote_client(tmp_path: Path,
                                                       workspace: tuple[Path, int]) -> None:
    _require_browser()
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    root, lab_port = workspace
    started = time.monotonic()
    jupyter = Jupyter(tmp_path, root)
    loops = LoopThread()
    client: Client | None = None
    try:
        jupyter.wait_ready()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                         args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page.goto(f"{jupyter.base}/lab/tree/browser_check.ipynb?token={jupyter.token}")
                page.locator(".jp-Notebook").first.wait_for(timeout=45_000)
                # the auto-started kernel is ready when the status bar says so
                page.locator(".jp-StatusBar-TextItem", has_text="Idle").first.wait_for(
                    timeout=45_000)

                # Run > Run All Cells
                page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
                page.locator(".lm-Menu-item:not(.lm-mod-disabled)",
                             has_text="Run All Cells").first.click()

                wet = page.locator(".widget-slider", has_text="Wet/Dry").first
                room = page.locator(".widget-slider", has_text="Room Size").first
                error = page.locator("[data-mime-type='application/vnd.jupyter.error']")
                _eventually(lambda: wet.is_visible() or error.count() > 0, 60)
                assert error.count() == 0, "a cell failed:\n" + error.first.inner_text()
                assert wet.locator(".widget-readout").inner_text().strip() == "0.30"

                client = Client(f"ws://127.0.0.1:{lab_port}/ws", timeout=15.0)
                token = Authenticator(AuthConfig(secret=SECRET)).issue("colleague")
                loops.run(client.connect())
                joined = loops.run(client.authenticate(token, session_id="browser"))
                assert "notebook" in joined["snapshot"]["members"]

                # (a) arrow keys on the handle -> the engine's value changes
                handle = wet.locator(".noUi-handle")
                handle.focus()
                for _ in range(STEPS):
                    page.keyboard.press("ArrowRight")
                    page.wait_for_timeout(60)
                expected = round(0.30 + 0.01 * STEPS, 2)
                _eventually(lambda: wet.locator(".widget-readout").inner_text().strip()
                            == f"{expected:.2f}")

                def engine_wet_dry() -> float:
                    reply = loops.run(client.get_parameters("drums", "reverb"))
                    return float(reply["parameters"]["wet_dry"])

                _eventually(lambda: abs(engine_wet_dry() - expected) < 1e-9)

                # (a2) a fast mouse drag: the page and the engine end on the same value
                damping = page.locator(".widget-slider", has_text="Damping").first
                box = damping.locator(".noUi-handle").bounding_box()
                assert box is not None
                x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
                page.mouse.move(x, y)
                page.mouse.down()
                page.mouse.move(x + 60, y, steps=12)
                page.mouse.up()

                def drag_settled() -> bool:
                    shown = float(damping.locator(".widget-readout").inner_text())
                    engine = float(loops.run(client.get_parameters("drums", "reverb"))
                                   ["parameters"]["damping"])
                    return shown > 0.5 and abs(engine - shown) < 1e-9

                _eventually(drag_settled)

                # (b) the client saw the moves as PLUGIN_STATE_UPDATEs from the notebook
                update = loops.run(client.wait_for(
                    "PLUGIN_STATE_UPDATE",
                    lambda m: m["data"].get("changed_by") == "notebook"
                    and "wet_dry" in (m["data"].get("parameters") or {})))
                assert 0.30 < update["data"]["parameters"]["wet_dry"] <= expected

                def final_value_delivered() -> bool:  # the throttle always delivers the last one
                    seen = [update, *client.received("PLUGIN_STATE_UPDATE")]
                    return any((m["data"].get("parameters") or {}).get("wet_dry") == expected
                               for m in seen)

                _eventually(final_value_delivered)

                # (c) the client's cursor and change show up in the page
                loops.run(client.cursor(track_id="drums", plugin_id="reverb",
                                        parameter_id="room_size"))
                loops.run(client.set_parameter("drums", "reverb", "room_size", 0.8))
                _eventually(lambda: room.locator(".widget-readout").inner_text().strip() == "0.80")
                page.get_by_text("✎ colleague").first.wait_for(timeout=10_000)
                page.get_by_text("colleague, notebook").first.wait_for(timeout=10_000)
                assert wet.locator(".widget-readout").inner_text().strip() == f"{expected:.2f}"

                page.keyboard.press("Control+b")  # hide the file browser for the picture
                page.wait_for_timeout(400)  # let the last repaint land
                page.screenshot(path=str(tmp_path / "widgets.png"))
            except BaseException:
                with contextlib.suppress(PlaywrightError):
                    page.screenshot(path=str(tmp_path / "failure.png"))
                    print("screenshot of the failure:", tmp_path / "failure.png")
                raise
            finally:
                browser.close()
        assert time.monotonic() - started < 120
    finally:
        if client is not None:
            with contextlib.suppress(OSError, TimeoutError, concurrent.futures.TimeoutError):
                loops.run(client.close(), timeout=5)
        loops.close()
        jupyter.stop()


# The seed's "Old Hook" (usePluginControls) as plain JavaScript: it never authenticates, adds
# with ADD_PLUGIN {trackId, name, path}, and keeps its plugin list from PLUGIN_ADDED and
# PARAMETER_UPDATED only (setPlugins / updatePluginParameter), reading fields at the top level.
OLD_HOOK_PAGE = """<!doctype html><html><head><meta charset=utf-8><title>old hook</title></head>
<body><script>
window.plugins = [];
function updatePluginParameter(pluginId, parameterId, value) {
  const plugin = plugins.find(p => p.id === pluginId);
  if (plugin) plugin.parameters[parameterId] = value;
}
window.connectOld = (url) => new Promise(resolve => {
  const ws = new WebSocket(url);
  ws.onmessage = (event) => {
    const data = JSON.parse(event.data);
    switch (data.type) {
      case 'PLUGIN_ADDED': plugins.push(data.plugin); break;
      case 'PARAMETER_UPDATED':
        updatePluginParameter(data.pluginId, data.parameterId, data.value); break;
    }
  };
  ws.onopen = () => { window.ws = ws; resolve(true); };
});
window.addPlugin = (name, path) => ws.send(JSON.stringify(
  {type: 'ADD_PLUGIN', data: {trackId: 'track_1', name: name, path: path}}));
</script></body></html>"""


def test_an_old_front_end_in_a_browser_stays_in_sync_with_new_clients() -> None:
    """Chromium runs the old hook; a new-format client adds a plugin, changes it, sends a batch
    and loads a preset: the old page's own plugin list ends equal to the server's state."""
    _require_browser()
    from playwright.sync_api import sync_playwright

    from pluginlab.config import ServerConfig
    from pluginlab.server import PluginServer

    loops = LoopThread()
    server = PluginServer(ServerConfig(port=0, db=None, jwt_secret=SECRET, allow_anonymous=True))
    client: Client | None = None
    try:
        loops.run(server.start())
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                         args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.set_content(OLD_HOOK_PAGE)
                assert page.evaluate("(url) => connectOld(url)", server.url) is True
                page.evaluate("() => addPlugin('Utility', 'Utility')")  # joins legacy_session
                _eventually(lambda: page.evaluate("plugins.length") == 1)

                client = Client(server.url, timeout=15.0)
                loops.run(client.connect())
                loops.run(client.authenticate(server.token("colleague"),
                                              session_id="legacy_session"))
                reverb = loops.run(client.add_plugin("track_1", "Reverb"))["plugin_id"]
                loops.run(client.set_parameter("track_1", reverb, "wet_dry", 0.8))
                loops.run(client.set_parameters("track_1", reverb,
                                                {"room_size": 0.2, "damping": 0.9}))
                utility = page.evaluate("plugins[0].id")
                loops.run(client.preset("track_1", utility, "load",
                                        preset_data={"gain": -6.0}))
                tracks = loops.run(client.session_state())["tracks"]
                server_side = {p["plugin_id"]: p["parameters"] for p in tracks["track_1"]}

                def page_side() -> dict[str, Any]:
                    return dict(page.evaluate(
                        "Object.fromEntries(plugins.map(p => [p.id, p.parameters]))"))

                _eventually(lambda: page_side() == server_side)
                assert page_side()[reverb]["wet_dry"] == 0.8
                assert page_side()[utility]["gain"] == -6.0
            finally:
                browser.close()
    finally:
        if client is not None:
            loops.run(client.close())
        loops.run(server.stop())
        loops.close()
