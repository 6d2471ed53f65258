"""Faults: kill -9 at random points of the data stages, a full disk while vision features are
written, and a storage root that cannot be created. After each, every visible Parquet file
reads whole, nothing half-written is left, and a re-run completes with each row exactly once.

kill -9 of training is covered in tests/test_training.py::test_killed_training_resumes_from_last_checkpoint
(deterministic point: just after a checkpoint). A random point costs minutes of CPU per
repetition there, so it is not repeated here."""

from __future__ import annotations

import errno
import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow.parquet as pq
import pytest

from assets.definitions import ALL_ASSETS, default_resources
from bitmar_pipeline.cli import main
from bitmar_pipeline.resources.settings import BitmarSettings
from bitmar_pipeline.storage import TMP_PREFIX

# Runs subprocesses or whole Dagster runs: deselect with -m 'not slow'; .ci/run runs it.
pytestmark = pytest.mark.slow

IMAGES, SHARD = 240, 60
ARGS = [
    "--set", f"data.coco.sample_num_images={IMAGES}",
    "--set", f"data.coco.shard_size={SHARD}",
    "--set", "data.robot.source=sample",
    "--set", "data.robot.sample_num_tasks=40",
    "--set", "vision.batch_size=4",
    "--set", "vision.num_workers=0",
]
DATA = "coco_raw,image_caption_pairs,vision_features"
KILLS = 3
SEED = 1958
WRITES_PER_RUN = (
    3 + 3 * IMAGES // SHARD
)  # manifest tables + coco_raw quarantine, then per shard: pairs, their quarantine, features


def assert_no_partial_data(store: Path) -> None:
    """Every visible Parquet file reads and holds a whole shard."""
    tables = store / "tables"
    for path in tables.rglob("*.parquet"):
        rows = pq.read_table(path).num_rows
        if path.parent.parent == tables / "vision_features":
            assert rows == SHARD, f"{path}: {rows} rows"
        elif path.parent == tables / "image_caption_pairs":
            assert rows == 5 * SHARD, f"{path}: {rows} rows"


def _snapshot(store: Path) -> dict[Path, int]:
    while True:
        try:
            return {p: p.stat().st_mtime_ns for p in (store / "tables").rglob("*.parquet")}
        except FileNotFoundError:  # a file was replaced while we looked
            continue


def _kill_after_writes(process: subprocess.Popen, store: Path, writes: int, extra: float) -> str:
    """SIGKILL once `writes` Parquet files have been written (created or replaced) plus `extra`
    seconds: a random point in the work however fast the machine is, not in interpreter start-up."""
    seen, count = _snapshot(store), 0
    deadline = time.monotonic() + 120
    while count < writes and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
        now = _snapshot(store)
        count += sum(1 for p, mtime in now.items() if seen.get(p) != mtime)
        seen = now
    time.sleep(extra)
    outcome = "finished first" if process.poll() is not None else f"killed after {count} writes + {extra:.2f}s"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    return outcome


def test_kill_at_random_points_then_rerun(tmp_path, monkeypatch):
    """Three kill -9s at seeded random points of one storage root's life (sample generation,
    manifest, alignment, encoding, catalog refresh: wherever they land), then a clean run."""
    rng = random.Random(SEED)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("DAGSTER_HOME", None)
    store = tmp_path / ".bitmar"
    landed = []
    for _ in range(KILLS):
        process = subprocess.Popen(
            [sys.executable, "-m", "bitmar_pipeline.cli", "run", *ARGS, "--select", DATA],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            landed.append(_kill_after_writes(process, store, rng.randrange(WRITES_PER_RUN), rng.uniform(0.0, 0.3)))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
        assert_no_partial_data(store)
    assert any(outcome.startswith("killed") for outcome in landed), landed

    monkeypatch.chdir(tmp_path)
    assert main(["run", *ARGS, "--select", DATA]) == 0, landed
    assert_no_partial_data(store)
    assert not [p for p in (store / "tables").rglob("*") if p.name.startswith(TMP_PREFIX)], (
        "temporary files left behind"
    )
    with duckdb.connect(str(store / "catalog.duckdb"), read_only=True) as con:
        assert con.execute("select count(*), count(distinct image_id) from vision_features").fetchone() == (
            IMAGES,
            IMAGES,
        )
        assert con.execute("select count(*), count(distinct caption_id) from image_caption_pairs").fetchone() == (
            5 * IMAGES,
            5 * IMAGES,
        )


SMALL = {
    "data.coco.sample_num_images": 12,
    "data.coco.shard_size": 6,
    "data.robot.source": "sample",
    "data.robot.sample_num_tasks": 20,
    "vision.batch_size": 4,
}


def _failure_text(result: dg.ExecuteInProcessResult) -> str:
    failure = next(e for e in result.all_events if e.is_step_failure)
    error, messages = failure.step_failure_data.error, []
    while error is not None:
        messages.append(error.message)
        error = error.cause
    return "\n".join(messages)


def test_full_disk_while_writing_features(tmp_path, monkeypatch):
    import pyarrow.parquet

    settings = BitmarSettings(overrides={"storage.root": str(tmp_path / "store"), **SMALL})
    resources = default_resources(settings)
    with dg.instance_for_test() as instance:
        assert dg.materialize(ALL_ASSETS, selection=["coco_raw"], instance=instance, resources=resources).success
        first, second = instance.get_dynamic_partitions("coco_shards")
        assert dg.materialize(
            ALL_ASSETS,
            selection=["image_caption_pairs", "vision_features"],
            partition_key=first,
            instance=instance,
            resources=resources,
        ).success
        assert dg.materialize(
            ALL_ASSETS, selection=["image_caption_pairs"], partition_key=second, instance=instance, resources=resources
        ).success
        (good,) = (tmp_path / "store" / "tables" / "vision_features").glob(f"*/{first}.parquet")
        good_bytes = good.read_bytes()

        real_write = pyarrow.parquet.write_table

        def disk_fills_up(table, where, **kwargs):
            if "vision_features" not in str(getattr(where, "name", where)):
                return real_write(table, where, **kwargs)
            buffer = io.BytesIO()
            real_write(table, buffer, **kwargs)
            where.write(buffer.getvalue()[: buffer.tell() // 2])  # half the file made it to disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(pyarrow.parquet, "write_table", disk_fills_up)
        for shard in (first, second):  # replacing a shard, and writing a new one
            result = dg.materialize(
                ALL_ASSETS,
                selection=["vision_features"],
                partition_key=shard,
                instance=instance,
                resources=resources,
                raise_on_error=False,
            )
            assert not result.success
            message = _failure_text(result)
            assert "No space left on device" in message and str(good.parent / f"{shard}.parquet") in message, message
        assert good.read_bytes() == good_bytes  # the earlier shard survived its failed replacement
        assert sorted(p.name for p in good.parent.iterdir()) == [good.name]  # no partial file, no temp file
        assert_tables_read(tmp_path / "store")

        monkeypatch.setattr(pyarrow.parquet, "write_table", real_write)
        assert dg.materialize(
            ALL_ASSETS, selection=["vision_features"], partition_key=second, instance=instance, resources=resources
        ).success
    with duckdb.connect(str(tmp_path / "store" / "catalog.duckdb"), read_only=True) as con:
        assert con.execute("select count(*), count(distinct image_id) from vision_features").fetchone() == (12, 12)


def assert_tables_read(store: Path) -> None:
    for path in (store / "tables").rglob("*"):
        assert not path.name.startswith(TMP_PREFIX), path
        if path.suffix == ".parquet":
            pq.read_table(path)


@pytest.mark.parametrize("asset", ["coco_raw", "robot_selection_tasks"])
def test_unwritable_storage_root_names_the_path(tmp_path, monkeypatch, asset):
    import dagster._core.definitions.policy as policy

    monkeypatch.setattr(policy, "calculate_delay", lambda **kwargs: 0.0)  # coco_raw retries; do not wait for it
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a regular file where a directory should be")
    root = blocker / "store"
    settings = BitmarSettings(overrides={"storage.root": str(root), **SMALL})
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            ALL_ASSETS,
            selection=[asset],
            instance=instance,
            resources=default_resources(settings),
            raise_on_error=False,
        )
    assert not result.success
    message = _failure_text(result)
    assert f"storage root {root} is not writable" in message and "Not a directory" in message, message
    assert blocker.read_text().startswith("a regular file") and sorted(p.name for p in tmp_path.iterdir()) == [
        blocker.name
    ]
