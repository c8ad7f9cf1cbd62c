"""The app's overhead (issue 21): tokens/s of a run started from the Run page against the same request from the CLI.

`streamlit run app/Home.py` on a free port (127.0.0.1), driven by Debian's headless Chromium through Playwright
(the same set-up as tests/test_browser.py), on the embedded model: the Run page's default prompt and strategy
(greedy), `--tokens` new tokens; the run streams, with the progress bar and the Stop button, as a user sees it.
The run's tokens/s is read from the run library (the app keeps every run there), and the same request runs through
`python -m declab run` in its own process right after. Repetitions alternate app and CLI; medians are reported, and
the ratio app / CLI (the issue's target: >= 0.90).

    .venv/bin/python -m bench.app_speed [--tokens 96] [--reps 2]

Needs /usr/bin/chromium and the playwright pip package (`make browser`). Writes bench/results/app_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from declab.run.store import open_store

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app/Home.py", "--server.headless", "true",
                                 "--server.port", str(port), "--server.address", "127.0.0.1"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench.app_speed: streamlit exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    proc.terminate()
    raise SystemExit("bench.app_speed: streamlit did not answer within 90 s")


def app_run(page, url: str, tokens: int) -> str:
    """Start one run from the Run page with its defaults and `tokens` new tokens; return the prompt used."""
    page.goto(f"{url}/run", wait_until="domcontentloaded")
    main = page.locator("[data-testid='stMain']").first
    button = main.get_by_role("button", name="Run", exact=True)
    button.wait_for(state="visible", timeout=120_000)
    box = main.get_by_role("spinbutton", name="Max new tokens")
    box.fill(str(tokens))
    box.press("Enter")
    page.wait_for_timeout(1000)
    prompt = main.get_by_role("textbox", name="Prompt", exact=True).input_value()
    button.click()
    main.get_by_role("button", name="CSV trace").wait_for(state="visible", timeout=600_000)
    return prompt


def last_app_run(store_path: Path) -> tuple[float, int | None]:
    """tokens/s and torch threads of the newest run the app kept in the run library."""
    store = open_store(str(store_path))
    meta, _frame = store.get(store.list(source="app", limit=1)[0]["run_id"])
    return float(meta["metrics"]["tokens_per_s"]), meta["metrics"].get("torch_threads")


def cli_tokens_per_s(prompt: str, tokens: int, env: dict) -> float:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run.json"
        subprocess.run([sys.executable, "-m", "declab", "run", "--strategy", "greedy", "--prompt", prompt,
                        "--max-new-tokens", str(tokens), "--json", str(out), "--quiet", "--no-store"],
                       cwd=ROOT, env=env, check=True, capture_output=True)
        return float(json.loads(out.read_text())["metrics"]["tokens_per_s"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.app_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"bench.app_speed: {CHROMIUM} is missing (make browser); skipped")
        return 0
    from playwright.sync_api import sync_playwright

    app_tps, cli_tps, app_threads = [], [], []
    with tempfile.TemporaryDirectory() as work:
        store = Path(work) / "runs.sqlite"
        env = dict(os.environ, DECLAB_STORE=str(store), STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
        env.pop("DECLAB_MODELS", None)
        proc, url = serve(env, Path(work) / "streamlit.log")
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
                page = browser.new_page(viewport={"width": 1400, "height": 1600})
                prompt = app_run(page, url, 8)                       # warm-up: loads the model into the app
                for _ in range(args.reps):
                    app_run(page, url, args.tokens)
                    tps, used = last_app_run(store)
                    app_tps.append(tps)
                    app_threads.append(used)
                    cli_tps.append(cli_tokens_per_s(prompt, args.tokens, env))
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    app, cli = statistics.median(app_tps), statistics.median(cli_tps)
    result = {"tokens": args.tokens, "reps": args.reps, "app_tokens_per_s": app_tps, "cli_tokens_per_s": cli_tps,
              "app_torch_threads": app_threads,
              "ratio": round(app / cli, 3)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "app_speed.json").write_text(json.dumps(result, indent=2))
    print(f"app {app:.1f} tokens/s, CLI {cli:.1f} tokens/s (greedy, {args.tokens} tokens, median of {args.reps})")
    print(f"target: app / CLI tokens/s {app / cli:.3f} (>= 0.90)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
