#!/usr/bin/env python3
"""Open a finished sweep in the MLflow UI with a headless Chromium, as a person would, and check
that the page `lmm-ray ui` prints lists the sweep's trial runs.

    python scripts/browser_check.py runs/quickstart [--port 5123] [--screenshot shot.png]

Starts `lmm-ray ui SWEEP --port PORT`, reads the runs-table URL it prints, waits for the server,
renders the page in Chromium (system package: `apt-get install chromium`; run headless with
`--dump-dom`, which returns the DOM once the page's scripts and requests have settled) and looks for
every trial run's name in it. Exit 0: all found; 1: some missing or the page never rendered;
2: bad arguments or no browser (set CHROMIUM=/path/to/chrome to choose one).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1400,900"]


def find_browser() -> str | None:
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trial_run_names(sweep_dir: Path) -> list[str]:
    sys.path.insert(0, str(ROOT))
    import json

    from lmm_ray import tracking

    saved = json.loads((sweep_dir / "sweep.json").read_text())
    uri = (saved.get("tracking") or {}).get("mlflow_uri") or f"sqlite:///{(sweep_dir / 'mlflow.db').resolve()}"
    experiment = (saved.get("tracking") or {}).get("experiment") or saved["name"]
    return sorted(r.info.run_name for r in tracking.child_runs(uri, experiment, saved["name"]))


def page_text(browser: str, url: str, budget_ms: int, timeout: float) -> str:
    out = subprocess.run([browser, *FLAGS, f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=timeout)
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", out.stdout, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", help="a finished sweep's storage folder (e.g. runs/quickstart)")
    ap.add_argument("--port", type=int, default=0, help="port for the MLflow UI (default: a free one)")
    ap.add_argument("--screenshot", help="also save a PNG of the page here")
    ap.add_argument("--timeout", type=float, default=180, help="seconds to wait for the UI and the page (default 180)")
    a = ap.parse_args(argv)
    browser = find_browser()
    if browser is None:
        print("browser_check: no Chromium found (apt-get install chromium, or set CHROMIUM=...)", file=sys.stderr)
        return 2
    sweep_dir = Path(a.sweep)
    if not (sweep_dir / "sweep.json").is_file():
        print(f"browser_check: {sweep_dir} is not a sweep's storage folder (no sweep.json)", file=sys.stderr)
        return 2
    names = trial_run_names(sweep_dir)
    port = a.port or free_port()
    log = open(sweep_dir / "browser_check_ui.log", "w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    ui = subprocess.Popen([sys.executable, "-m", "lmm_ray.cli", "ui", str(sweep_dir), "--port", str(port)], stdout=subprocess.PIPE,
                          stderr=log, text=True, env=env, start_new_session=True)
    try:
        url, deadline = None, time.time() + a.timeout
        while url is None:  # the URL line comes first, before MLflow starts
            line = ui.stdout.readline()
            if not line:
                print(f"browser_check: `lmm-ray ui` exited ({ui.poll()}) before printing a URL", file=sys.stderr)
                return 1
            print("ui> " + line.rstrip())
            m = re.search(r"runs table: (\S+)", line)
            url = m.group(1) if m else None
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline or ui.poll() is not None:
                    print("browser_check: the MLflow UI did not come up (see browser_check_ui.log)", file=sys.stderr)
                    return 1
                time.sleep(1)
        text = ""
        for budget in (20000, 60000):  # a slow machine: give the page's requests more (virtual) time
            text = page_text(browser, url, budget, a.timeout)
            if all(n in text for n in names):
                break
        missing = [n for n in names if n not in text]
        if a.screenshot:
            subprocess.run([browser, *FLAGS, "--virtual-time-budget=20000", f"--screenshot={Path(a.screenshot).resolve()}", url],
                           capture_output=True, timeout=a.timeout)
        shown = re.search(r"(\d+) matching runs?", text)
        print(f"page: {url}\n  {shown.group(0) if shown else 'no run count on the page'}; "
              f"trial runs found {len(names) - len(missing)}/{len(names)}" + (f"; missing: {missing}" if missing else ""))
        return 0 if names and not missing else 1
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
