"""End to end in a real browser: `streamlit run app/Home.py` on the embedded model, driven in headless Chromium.

Uses Debian's chromium (/usr/bin/chromium; `make browser` installs it where apt-get is available) through the
Playwright pip package; Playwright's own browser download is never used. Skipped, with what to install, when
chromium is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT_COPY = Path("/tmp/declab-run.png")
EMBEDDED = "smollm2-135m-instruct"

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"streamlit did not answer within {timeout_s} s:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture
def streamlit_app(tmp_path):
    """The app on the real registry (DECLAB_MODELS unset: the embedded model is the default), on a free port.
    Only the process started here is terminated afterwards."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install chromium chromium-driver`, "
                    "or `make browser` as root) to run the browser test")
    pytest.importorskip("playwright.sync_api", reason="the Playwright pip package is missing: pip install playwright")
    env = dict(os.environ)
    env.pop("DECLAB_MODELS", None)
    env["STREAMLIT_BROWSER_GATHER_USAGE_STATS"] = "false"
    port = _free_port()
    log = tmp_path / "streamlit.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app/Home.py", "--server.headless", "true",
             "--server.port", str(port), "--server.address", "127.0.0.1"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _expected_text(lm, prompt: str, max_new_tokens: int) -> str:
    """Greedy on the embedded model with the app's settings, computed here through the library. Greedy is
    prefix-consistent, so the first tokens of the app's run are checked with a short reference run."""
    from declab.models.registry import load_registry
    from declab.run import Run, RunRequest
    registry = load_registry(ROOT / "models.yaml")
    run = Run(lm, RunRequest(model=EMBEDDED, strategy="greedy", prompt=prompt, max_new_tokens=max_new_tokens,
                             seed=0), registry)
    return run.run_to_end().sequences[0].text


def _squash(text: str) -> str:
    return " ".join(text.split())


def test_run_greedy_on_the_embedded_model_in_chromium(streamlit_app, real_lm, tmp_path):
    from playwright.sync_api import sync_playwright

    t0 = time.monotonic()

    def mark(what: str) -> None:
        print(f"[browser test] {time.monotonic() - t0:6.1f} s  {what}")

    url, log = streamlit_app
    shot = tmp_path / "declab-run.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            page.goto(url, wait_until="domcontentloaded")
            run_button = page.get_by_role("button", name="Run", exact=True)
            run_button.wait_for(state="visible", timeout=60_000)
            mark("page ready")
            assert page.get_by_role("heading", name="declab").first.is_visible()
            prompt = page.get_by_role("textbox", name="Prompt", exact=True).input_value()
            max_new = int(page.get_by_role("spinbutton", name="Max new tokens").input_value())
            assert prompt.strip() and max_new > 0

            run_button.click()
            mark("clicked Run")
            # first load of the embedded model can convert the GGUF (~20 s); decoding takes a few seconds on an idle
            # CPU, much longer on a busy shared one
            page.locator(".js-plotly-plot").first.wait_for(state="visible", timeout=300_000)
            mark("plotly chart visible")
            page.get_by_role("button", name="CSV trace").wait_for(state="visible", timeout=30_000)
            page.wait_for_timeout(1500)                                      # let the charts finish drawing
            page.screenshot(path=str(shot))              # Streamlit scrolls inside its main block: a tall viewport
            shutil.copyfile(shot, SCREENSHOT_COPY)

            body = page.locator("section.main, [data-testid='stMain']").first.inner_text()
            assert "Traceback" not in body, body[-2000:]
            expected = _squash(_expected_text(real_lm, prompt, min(max_new, 12)))
            mark("reference text computed")
            assert expected, "the embedded model generated no text"
            assert expected[:30] in _squash(body), (expected, body[:3000], log.read_text()[-2000:])
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
