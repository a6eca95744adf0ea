"""A real browser: Debian's headless Chromium logs into the Airflow UI served by
`airflow standalone`, finds the pipeline's successful run and the report page, and saves
screenshots under settings.reports_dir.

Chromium is driven through the Chrome DevTools Protocol over ``--remote-debugging-pipe``
(file descriptors 3 and 4, NUL-terminated JSON), so no driver binary or Python package
beyond the standard library is needed, and nothing is downloaded. The set-up
(scripts/setup.sh -> scripts/setup_chromium.sh) installs Debian's chromium where it is
missing and apt-get can; where it cannot, it writes why to .venv/.reqdedup-chromium-missing
and this test skips with that reason.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from airflow_server import DAG_ID, PASSWORD, USER

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-dev-shm-usage", "--window-size=1400,1000"]

MISSING = Path(__file__).resolve().parents[1] / ".venv" / ".reqdedup-chromium-missing"


def missing_reason() -> str:
    """Why there is no chromium: the set-up's reason, else that the set-up did not run."""
    if MISSING.is_file() and MISSING.read_text().strip():
        return MISSING.read_text().strip()
    return "chromium not installed (run scripts/setup.sh: it installs Debian's chromium where apt-get can)"


pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason=missing_reason())]


class Chromium:
    """Minimal CDP client over a pipe: one page, commands, JS evaluation, screenshots."""

    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="reqdedup_chromium_")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def child_fds():  # the browser reads commands on fd 3 and writes replies on fd 4
            import fcntl

            # Move both ends above 3 and 4 first: a pipe end may itself be fd 3 or 4.
            r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "about:blank"],
            preexec_fn=child_fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf = b""
        self._id = 0
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable", session=True)
        self.send("Runtime.enable", session=True)

    def _read_message(self, timeout: float) -> dict:
        import select

        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._from_browser], [], [], timeout)
            if not ready:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: bool = False, timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(max(0.1, deadline - time.monotonic()))
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error in {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url}, session=True)

    def wait_for(self, expression: str, timeout: float = 90, what: str = "") -> object:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.js(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            time.sleep(0.5)
        text = self.js("document.body ? document.body.innerText.slice(0, 1500) : ''")
        raise TimeoutError(f"waited {timeout:.0f} s for {what or expression} at {self.js('location.href')}:\n{text}")

    def type_into(self, selector: str, text: str) -> None:
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", {"text": text}, session=True)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=10)
        os.close(self._to_browser)
        os.close(self._from_browser)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    b = Chromium()
    yield b
    b.close()


def test_ui_login_successful_run_and_report_page(standalone, pipeline_run, browser, settings):
    server, run_id = standalone, pipeline_run["run_id"]
    b = browser

    # 1. Log in through the UI's own form (simple auth manager).
    b.goto(server.url + "/")
    b.wait_for("document.querySelector('input[type=password]') !== null", what="the login form")
    b.type_into("input:not([type=password])", USER)
    b.type_into("input[type=password]", PASSWORD)
    b.wait_for("!document.querySelector('button[type=submit]').disabled", what="the enabled Sign in button")
    b.js("document.querySelector('button[type=submit]').click()")
    b.wait_for("!location.pathname.startsWith('/auth/') && /dags/i.test(document.body.innerText)",
               what="the home page after login")

    # 2. The pipeline's run, successful.
    b.goto(f"{server.url}/dags/{DAG_ID}/runs/{run_id}")
    b.wait_for(f"document.body.innerText.includes({json.dumps(run_id)})", what="the run page")
    b.wait_for("/success/i.test(document.body.innerText)", what="the run's success state")
    run_png = b.screenshot(settings.reports_dir / "screenshots" / "airflow_pipeline_run.png")

    # 3. The DAG's run list shows it too, by its id.
    b.goto(f"{server.url}/dags/{DAG_ID}/runs")
    b.wait_for(f"document.body.innerText.includes({json.dumps(run_id)})", what="the run in the runs list")

    # 4. The report page inside the UI (external view -> iframe of the plugin's app).
    b.goto(f"{server.url}/plugin/reqdedup-report")
    b.wait_for("(() => { const f = document.querySelector('iframe');"
               " return f && f.contentDocument && f.contentDocument.body &&"
               " f.contentDocument.body.innerText.includes('latest reports'); })()",
               what="the report page in its frame")
    frame_text = b.js("document.querySelector('iframe').contentDocument.body.innerText")
    assert "Storage" in frame_text, frame_text[:2000]
    report_png = b.screenshot(settings.reports_dir / "screenshots" / "airflow_report_page.png")
    for png in (run_png, report_png):
        assert png.stat().st_size > 10_000, png
    print(f"screenshots: {run_png} {report_png}")
