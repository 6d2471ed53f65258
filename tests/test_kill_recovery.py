"""kill -9 in the middle of feature extraction: no partial shard is ever visible, and the
next run completes every shard with each image exactly once."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from bitmar_pipeline.cli import main

# Runs subprocesses or whole Dagster runs: deselect with -m 'not slow'; .ci/run runs it.
pytestmark = pytest.mark.slow

ARGS = [
    "--set", "data.coco.sample_num_images=600",
    "--set", "data.coco.shard_size=150",
    "--set", "data.robot.source=sample",
    "--set", "data.robot.sample_num_tasks=40",
    "--set", "vision.batch_size=1",
    "--set", "vision.num_workers=0",
]


def test_kill_mid_shard_then_rerun(tmp_path, monkeypatch):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("DAGSTER_HOME", None)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bitmar_pipeline.cli",
            "run",
            *ARGS,
            "--select",
            "coco_raw,image_caption_pairs,vision_features",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    features = tmp_path / ".bitmar" / "tables" / "vision_features"
    deadline = time.monotonic() + 240
    try:
        # Wait until the first shard's features are written: the next shard is then in flight.
        while time.monotonic() < deadline and process.poll() is None:
            if any(features.glob("*/*.parquet")):
                break
            time.sleep(0.01)
        assert process.poll() is None, "the run finished before it could be killed mid-shard"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    written = sorted(p for p in features.glob("*/*") if p.is_file())
    complete = [p for p in written if p.suffix == ".parquet"]
    assert 1 <= len(complete) < 4, "the kill should land while shards remain"
    for path in complete:  # every visible shard is whole
        assert pq.read_table(path).num_rows == 150

    monkeypatch.chdir(tmp_path)  # the sample profile's storage root is relative to the working directory
    assert main(["run", *ARGS, "--select", "coco_raw,image_caption_pairs,vision_features"]) == 0
    with duckdb.connect(str(Path(".bitmar") / "catalog.duckdb"), read_only=True) as con:
        total, distinct = con.execute("select count(*), count(distinct image_id) from vision_features").fetchone()
    assert total == distinct == 600
