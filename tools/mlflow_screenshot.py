"""Screenshot an MLflow run page in headless Chromium: what a user sees when they open a rayoodkd run.

    python tools/mlflow_screenshot.py --store sqlite:////abs/runs/mlflow.db --run RUN_ID --out run.png
    python tools/mlflow_screenshot.py --store sqlite:////abs/runs/mlflow.db --run RUN_ID --tab model-metrics

Starts ``mlflow server`` on a free local port against the store, loads the run's page (``--tab``:
``overview``, ``model-metrics``, ``system-metrics``, ``artifacts``) in headless Chromium driven by Playwright,
waits for its charts, writes a PNG, prints the page's headings in order and stops the server. Needs
``pip install playwright`` and a Chromium on the PATH (``chromium``, ``chromium-browser`` or
``google-chrome``; on Debian ``apt install chromium``); Playwright's own browser download is not used.
docs/outputs.md shows what it captured.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {url} did not answer within {seconds:.0f} s")


def screenshot(store: str, run_id: str, out: Path, tab: str, size: str, wait_ms: int) -> list[str]:
    """Serve ``store``, load the run page's ``tab``, wait for its charts, save it as ``out``; return the
    metric keys of the charts drawn, in page order."""
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    browser = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if browser is None:
        raise FileNotFoundError(f"no headless browser: none of {', '.join(BROWSERS)} is on the PATH")
    experiment_id = MlflowClient(store).get_run(run_id).info.experiment_id
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            store,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_until_up(url, 90)
        page_url = f"{url}/#/experiments/{experiment_id}/runs/{run_id}"
        if tab != "overview":
            page_url += f"/{tab}"
        # MLflow 3.17's UI picks its GenAI or model-training navigation from this parameter (else from the
        # browser's last choice, GenAI for a fresh profile).
        page_url += "?workflowType=machine_learning"
        width, height = (int(v) for v in size.split(","))
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=browser, args=["--no-sandbox"])
            page = chromium.new_page(viewport={"width": width, "height": height})
            page.goto(page_url)
            if tab in ("model-metrics", "system-metrics"):
                page.wait_for_selector(".js-plotly-plot", timeout=wait_ms)
            page.wait_for_timeout(3000)
            page.screenshot(path=str(out))
            # Chart sections are headed "PREFIX (N charts)", e.g. "best_val (1)", "loss (2)".
            # Each drawn chart's legend reads "RUN NAME (metric/key)".
            lines = page.locator("body").inner_text().splitlines()
            charts = [m.group(1) for line in lines if (m := re.search(r"\(([\w.-]+/[\w./-]+)\)$", line))]
            chromium.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return charts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--store", required=True, help="the MLflow tracking URI (e.g. sqlite:////abs/mlflow.db)"
    )
    parser.add_argument("--run", required=True, help="the run ID")
    parser.add_argument("--out", type=Path, default=Path("mlflow-run.png"))
    parser.add_argument("--tab", default="model-metrics", help="overview, model-metrics, system-metrics, ...")
    parser.add_argument("--size", default="1400,1600", help="window WIDTH,HEIGHT in pixels")
    parser.add_argument("--wait-ms", type=int, default=60000, help="how long the charts may take to appear")
    args = parser.parse_args(argv)
    charts = screenshot(args.store, args.run, args.out, args.tab, args.size, args.wait_ms)
    print(f"screenshot: {args.out}")
    print("charts drawn, in page order: " + ", ".join(charts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
