"""The Dagster UI in a real browser: `dagster dev` on loopback, the asset catalog in headless
Chromium (Playwright driving Debian's /usr/bin/chromium), every asset shown.

Skipped with the reason when Chromium or the playwright package is missing (.ci/run installs
both; a user's clone may have neither)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from assets.definitions import ALL_ASSETS

# Runs subprocesses or whole Dagster runs: deselect with -m 'not slow'; .ci/run runs it.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SERVER_START_SECONDS = 180
ASSET_NAMES = sorted(a.key.to_user_string() for a in ALL_ASSETS)
JOB_NAMES = ["full_pipeline", "retrain", "feature_backfill"]
AUTOMATION_NAMES = ["retrain_schedule", "bitmar_automation"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the whole group (webserver, daemon, code server), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def dagster_dev(tmp_path: Path) -> Iterator[str]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "BITMAR_CONFIG"}
    env.update(DAGSTER_HOME=str(home), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DAGSTER_DISABLE_TELEMETRY="yes")
    port = _free_port()
    log = (tmp_path / "dagster_dev.log").open("w")
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dagster"),
            "dev",
            "-w",
            "workspace.yaml",
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            if process.poll() is not None:
                log = (tmp_path / "dagster_dev.log").read_text()[-3000:]
                pytest.fail(f"dagster dev exited with {process.returncode}:\n{log}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{base}/server_info", timeout=2) as response:
                    if response.status == 200:
                        break
            if time.monotonic() > deadline:
                pytest.fail(f"dagster dev did not answer /server_info within {SERVER_START_SECONDS}s")
            time.sleep(0.5)
        yield base
    finally:
        _stop(process)
        log.close()


def _asset_link(page, name: str):
    """The visible name of the asset, on a link to its own page."""
    return page.locator(f'a[href$="/assets/{name}"]').get_by_text(name, exact=True).filter(visible=True)


def test_asset_catalog_shows_every_asset(tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is not installed (pip install -e '.[test]')"
    )

    with dagster_dev(tmp_path) as base, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1800, "height": 1400},
        )
        try:
            page = browser.new_page()
            # /assets is the catalog: one row per asset. (The global lineage at /asset-groups starts
            # with groups collapsed; the graph is checked below through one asset's lineage.)
            page.goto(f"{base}/assets", wait_until="domcontentloaded", timeout=60_000)
            # Rows appear once the code location has loaded, which can lag behind /server_info.
            for name in ASSET_NAMES:
                _asset_link(page, name).first.wait_for(state="visible", timeout=120_000)
            shown = {name: _asset_link(page, name).count() for name in ASSET_NAMES}
            assert all(shown.values()), f"assets missing from the catalog: {[n for n, c in shown.items() if not c]}"
            # Statuses come from the instance: wait for them so the screenshot shows them.
            page.get_by_text(re.compile(r"^Loading")).first.wait_for(state="detached", timeout=60_000)
            skip = page.get_by_role("button", name="Skip")  # dagster dev's first-visit newsletter dialog
            if skip.count():
                skip.first.click()
                page.get_by_text("Join the Dagster community").wait_for(state="hidden", timeout=10_000)
            catalog = tmp_path / "bitmar_ui.png"
            page.screenshot(path=str(catalog), full_page=True)

            # The asset graph: hub_release's upstream lineage is the whole graph (every asset
            # feeds the release), drawn with every group expanded.
            page.set_viewport_size({"width": 2400, "height": 1400})  # narrower zooms out and truncates long labels
            page.goto(
                f"{base}/assets/hub_release?view=lineage&lineageScope=upstream&lineageDepth=12",
                wait_until="domcontentloaded",
                timeout=60_000,
            )
            # Node labels are split across elements, so read the page's text rather than locating each label.
            deadline = time.monotonic() + 120
            missing = list(ASSET_NAMES)
            while missing and time.monotonic() < deadline:
                text = page.inner_text("body")
                missing = [name for name in ASSET_NAMES if name not in text]
                time.sleep(1)
            assert not missing, f"assets missing from the asset graph: {missing}"
            graph = tmp_path / "bitmar_ui_graph.png"
            page.screenshot(path=str(graph))
            for screenshot in (catalog, graph):
                assert screenshot.stat().st_size > 10_000
                if os.environ.get("BITMAR_SCREENSHOT_DIR"):
                    target = Path(os.environ["BITMAR_SCREENSHOT_DIR"])
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy(screenshot, target / screenshot.name)

            # workspace.yaml's location_name: the UI names the code location `bitmar`.
            for path, names in (("/locations", ("bitmar",)), ("/jobs", JOB_NAMES), ("/automation", AUTOMATION_NAMES)):
                page.goto(f"{base}{path}", wait_until="domcontentloaded", timeout=60_000)
                for name in names:
                    page.get_by_text(name, exact=True).filter(visible=True).first.wait_for(
                        state="visible", timeout=60_000
                    )
        finally:
            browser.close()
