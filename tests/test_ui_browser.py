"""The Dagster UI in a real browser: `dagster dev` on loopback over an instance holding a small
sample run, the asset catalog in headless Chromium (Playwright driving Debian's
/usr/bin/chromium): every asset shown; the materialized tables' row counts and Parquet columns
as a user reads them on the asset pages; the stale marker downstream after a setting change.

Skipped with the reason when Chromium or the playwright package is missing (.ci/run installs
both; a user's clone may have neither)."""

from __future__ import annotations

import contextlib
import dataclasses
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
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import pytest

from assets.definitions import ALL_ASSETS, default_resources
from bitmar_pipeline.resources.settings import BitmarSettings

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
# The sample run the UI shows: two shards of three images, 20 robot tasks per source file.
SAMPLE = {
    "data.coco.sample_num_images": 6,
    "data.coco.shard_size": 3,
    "data.robot.source": "sample",
    "data.robot.sample_num_tasks": 20,
    "vision.batch_size": 4,
}
# Asset -> its Parquet files under <storage>/tables (the catalog's table names: robot_tasks, ...).
TABLE_FILES = {
    "image_caption_pairs": "image_caption_pairs/*.parquet",
    "vision_features": "vision_features/*/*.parquet",
    "robot_selection_tasks": "robot_tasks/all.parquet",
}


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
    """`dagster dev` on the instance in <tmp_path>/dagster_home (created when missing)."""
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
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


@dataclasses.dataclass
class SampleUI:
    base: str  # the webserver's URL
    root: Path  # dagster_home, store (the sample run's storage root), dagster_dev.log
    sync_api: Any  # playwright.sync_api

    def settings(self, **overrides) -> BitmarSettings:
        return BitmarSettings(overrides={"storage.root": str(self.root / "store"), **SAMPLE, **overrides})

    def materialize(self, settings: BitmarSettings, selection: list[str], partition: str | None = None) -> None:
        """A run straight into the instance the webserver reads (as `bitmar run` would launch it)."""
        with dg.DagsterInstance.from_config(str(self.root / "dagster_home")) as instance:
            result = dg.materialize(
                ALL_ASSETS,
                selection=selection,
                instance=instance,
                resources=default_resources(settings),
                partition_key=partition,
            )
            assert result.success

    def shards(self) -> list[str]:
        with dg.DagsterInstance.from_config(str(self.root / "dagster_home")) as instance:
            return instance.get_dynamic_partitions("coco_shards")

    def rows(self, asset: str) -> tuple[int, list[str]]:
        """The table's real row count and Parquet columns, read from its files."""
        files = sorted((self.root / "store" / "tables").glob(TABLE_FILES[asset]))
        assert files, f"no Parquet files for {asset}"
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files), pq.read_schema(files[0]).names


def _require_browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found (Debian: apt-get install chromium)")
    return pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is not installed (pip install -e '.[test]')"
    )


@pytest.fixture(scope="module")
def sample_ui(tmp_path_factory) -> Iterator[SampleUI]:
    """The sample profile's data assets materialized into a fresh instance (both shards, the
    robot tables, the tokenizer), then `dagster dev` on that instance."""
    sync_api = _require_browser()  # before the runs: a clone without Chromium skips at once
    root = tmp_path_factory.mktemp("sample_ui")
    (root / "dagster_home").mkdir()
    ui = SampleUI(base="", root=root, sync_api=sync_api)
    ui.materialize(ui.settings(), ["coco_raw", "robot_selection_tasks"])
    for shard in ui.shards():
        ui.materialize(ui.settings(), ["image_caption_pairs", "vision_features"], shard)
    ui.materialize(ui.settings(), ["text_tokenizer"])
    with dagster_dev(root) as base:
        yield dataclasses.replace(ui, base=base)


@contextlib.contextmanager
def _browser(ui: SampleUI, tmp_path: Path) -> Iterator[Any]:
    """A page in headless Chromium (its own profile under tmp_path)."""
    with ui.sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1800, "height": 1400},
        )
        try:
            yield browser.new_page()
        finally:
            browser.close()


def _save(screenshot: Path) -> None:
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("BITMAR_SCREENSHOT_DIR"):
        target = Path(os.environ["BITMAR_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, target / screenshot.name)


def _asset_link(page, name: str):
    """The visible name of the asset, on a link to its own page."""
    return page.locator(f'a[href$="/assets/{name}"]').get_by_text(name, exact=True).filter(visible=True)


def test_asset_catalog_shows_every_asset(sample_ui, tmp_path):
    base = sample_ui.base
    with _browser(sample_ui, tmp_path) as page:
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
            _save(screenshot)

        # workspace.yaml's location_name: the UI names the code location `bitmar`.
        for path, names in (("/locations", ("bitmar",)), ("/jobs", JOB_NAMES), ("/automation", AUTOMATION_NAMES)):
            page.goto(f"{base}{path}", wait_until="domcontentloaded", timeout=60_000)
            for name in names:
                page.get_by_text(name, exact=True).filter(visible=True).first.wait_for(
                    state="visible", timeout=60_000
                )


def _overview(page, base: str, asset: str) -> str:
    """The asset's Overview page once its status has loaded, as the text a user reads."""
    page.goto(f"{base}/assets/{asset}", wait_until="domcontentloaded", timeout=60_000)
    page.get_by_text("Latest materialization", exact=True).first.wait_for(state="visible", timeout=120_000)
    page.get_by_text(re.compile(r"^Loading")).first.wait_for(state="detached", timeout=60_000)
    return page.inner_text("body")


def _catalog_row(page, asset: str) -> str:
    """The text of the asset's row in the catalog table (name, description, group, status)."""
    # The catalog is a virtualized table of div rows (VirtualizedTable_row__<hash>), no <tr>.
    row = page.locator('div[class*="VirtualizedTable_row_"]').filter(has=_asset_link(page, asset)).first
    return row.inner_text()


def test_materialized_assets_show_row_counts_columns_and_stale_markers(sample_ui, tmp_path):
    """What a user reads after a sample run: each table's row count and Parquet columns on its
    asset page (from dagster/row_count and dagster/column_schema), a caption of the data in the
    preview; then a robot data setting changes, robot_selection_tasks is re-materialized and its
    downstream text_tokenizer is marked unsynced, in the catalog and on its page."""
    base = sample_ui.base
    # The first-visit newsletter dialog (dismissed through the UI in the catalog test) would
    # cover the pages: mark it seen, as its Skip button does.
    request = urllib.request.Request(
        f"{base}/graphql", data=b'{"query": "mutation { setNuxSeen }"}', headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    with _browser(sample_ui, tmp_path) as page:
        for asset in TABLE_FILES:
            rows, columns = sample_ui.rows(asset)
            text = _overview(page, base, asset)
            page.screenshot(path=str(tmp_path / f"bitmar_ui_{asset}.png"), full_page=True)
            shown = re.search(r"\nRow count\s*\n\s*([\d,]+)\s*\n", text)
            assert shown, f"{asset}: no 'Row count' on its page:\n{text[:1500]}"
            assert int(shown.group(1).replace(",", "")) == rows, f"{asset}: shows {shown.group(1)}, has {rows} rows"
            # The Columns section: one line per column name, then its Arrow type, in Parquet order.
            assert "\nColumns\n" in text and "Column name\tType\tDescription" in text, f"{asset}: no Columns section"
            section = text.split("Column name\tType\tDescription", 1)[1].split("\nMetadata\n", 1)[0]
            lines = [line.strip() for line in section.splitlines() if line.strip()]
            assert [line for line in lines if line in columns] == columns, f"{asset}: Columns shows {lines}"
        # image_caption_pairs' preview: the first caption of the last shard, as stored.
        last = sorted((sample_ui.root / "store" / "tables" / "image_caption_pairs").glob("*.parquet"))[-1]
        caption = pq.read_table(last, columns=["caption"]).column("caption")[0].as_py()
        text = _overview(page, base, "image_caption_pairs")
        assert caption[:60] in text, f"the preview does not show {caption!r}"

        # Nothing is unsynced after the sample run.
        text = _overview(page, base, "text_tokenizer")
        assert "Unsynced" not in text
        page.goto(f"{base}/assets", wait_until="domcontentloaded", timeout=60_000)
        _asset_link(page, "text_tokenizer").first.wait_for(state="visible", timeout=120_000)
        page.get_by_text(re.compile(r"^Loading")).first.wait_for(state="detached", timeout=60_000)
        assert "Upstream data" not in _catalog_row(page, "text_tokenizer")

        # A setting change: more robot tasks per file, robot_selection_tasks re-materialized.
        sample_ui.materialize(sample_ui.settings(**{"data.robot.sample_num_tasks": 25}), ["robot_selection_tasks"])
        page.reload(wait_until="domcontentloaded", timeout=60_000)
        _asset_link(page, "text_tokenizer").first.wait_for(state="visible", timeout=120_000)
        page.get_by_text("Upstream data", exact=True).first.wait_for(state="visible", timeout=60_000)
        assert "Upstream data" in _catalog_row(page, "text_tokenizer")
        assert "Upstream data" not in _catalog_row(page, "robot_selection_tasks")
        page.screenshot(path=str(tmp_path / "bitmar_ui_stale_catalog.png"), full_page=True)
        page.goto(f"{base}/assets/text_tokenizer", wait_until="domcontentloaded", timeout=60_000)
        page.get_by_text("Unsynced (1)", exact=True).first.wait_for(state="visible", timeout=60_000)
        page.screenshot(path=str(tmp_path / "bitmar_ui_stale_tokenizer.png"))
        # The new row count reaches robot_selection_tasks' page.
        rows, _ = sample_ui.rows("robot_selection_tasks")
        assert f"\nRow count\n{rows}\n" in _overview(page, base, "robot_selection_tasks")
    for screenshot in sorted(tmp_path.glob("bitmar_ui_*.png")):
        _save(screenshot)
