"""Jobs, schedule, declarative automation and retry policies (assets/operations.py); a backfill through
Dagster's own backfill daemon code; several shard runs at once against one storage root."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow.parquet as pq
import pytest

from assets.definitions import ALL_ASSETS, build_definitions, default_resources
from assets.operations import AUTOMATION_SENSOR, GPU_POOL, NETWORK_RETRY, ROBOT_FILES
from bitmar_pipeline.config import ConfigError, load_config
from bitmar_pipeline.data.coco_download import VerificationError
from bitmar_pipeline.data.coco_layout import AnnotationFileError
from bitmar_pipeline.data.robot_sample import generate_sample_robot_datasets
from bitmar_pipeline.resources.settings import BitmarSettings
from tests.factories import (
    REPO,
    run_asset_backfill,
    synchronous_instance,
    write_location,
)

# Runs subprocesses or whole Dagster runs: deselect with -m 'not slow'; .ci/run runs it.
pytestmark = pytest.mark.slow

FEATURES = ["image_caption_pairs", "vision_features"]
RETRAIN = {
    "multimodal_pretrain",
    "reasoning_sft",
    "grpo_policy",
    "evaluation_report",
    "quantization_report",
    "hub_release",
}
# 4 shards of 3 generated images (5 captions each): cheap, but enough to exercise shard fan-out.
SMALL = {
    "data.coco.sample_num_images": 12,
    "data.coco.shard_size": 3,
    "data.robot.source": "sample",
    "data.robot.sample_num_tasks": 20,
    "vision.batch_size": 4,
}


def _settings(tmp_path: Path, **overrides) -> BitmarSettings:
    return BitmarSettings(overrides={"storage.root": str(tmp_path / "store"), **SMALL, **overrides})


def _keys(job: dg.JobDefinition) -> set[str]:
    return {k.to_user_string() for k in job.asset_layer.executable_asset_keys}


def test_jobs_schedule_and_automation_are_defined(tmp_path):
    settings = _settings(
        tmp_path,
        **{
            "schedules.retrain_cron": "30 2 * * 1",
            "schedules.timezone": "Europe/Berlin",
            "schedules.robot_sensor_interval_seconds": 120,
        },
    )
    defs = build_definitions(settings)
    dg.Definitions.validate_loadable(defs)

    full = defs.resolve_job_def("full_pipeline")
    assert _keys(full) == {a.key.to_user_string() for a in ALL_ASSETS}
    assert full.partitions_def.name == "coco_shards"  # launched over the shards it is an asset backfill
    assert _keys(defs.resolve_job_def("retrain")) == RETRAIN
    assert defs.resolve_job_def("retrain").run_tags["bitmar/training"] == "true"
    backfill = defs.resolve_job_def("feature_backfill")
    assert _keys(backfill) == set(FEATURES) and backfill.partitions_def.name == "coco_shards"

    schedule = defs.resolve_schedule_def("retrain_schedule")
    assert (schedule.job_name, schedule.cron_schedule, schedule.execution_timezone) == (
        "retrain",
        "30 2 * * 1",
        "Europe/Berlin",
    )
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED

    (sensor,) = defs.sensors  # the hand-written sensors are gone: automation conditions replace them
    assert isinstance(sensor, dg.AutomationConditionSensorDefinition) and sensor.name == AUTOMATION_SENSOR
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED and sensor.minimum_interval_seconds == 30
    conditions = {a.key.to_user_string(): a.automation_conditions_by_key.get(a.key) for a in ALL_ASSETS}
    assert conditions["coco_raw"] is None  # downloads only when asked
    assert {k for k, c in conditions.items() if c is not None and c.get_label() == "on_missing"} == set(FEATURES)
    assert {k for k, c in conditions.items() if c is not None and c.get_label() == "eager"} == RETRAIN | {
        "robot_selection_tasks",
        "text_tokenizer",
    }
    robot_files = next(a for a in defs.assets if isinstance(a, dg.SourceAsset) and a.key == ROBOT_FILES)
    assert robot_files.is_observable and "*/2 * * * *" in str(robot_files.automation_condition)  # 120 s

    assert defs.resolve_assets_def("coco_raw").op.retry_policy == NETWORK_RETRY
    assert defs.resolve_assets_def("hub_release").op.retry_policy is None  # the Hub resource retries uploads
    assert NETWORK_RETRY.max_retries == 3 and NETWORK_RETRY.backoff == dg.Backoff.EXPONENTIAL


def test_sample_profile_has_the_schedule_defaults():
    schedules = load_config(REPO / "configs" / "sample.yaml").schedules
    assert (schedules.retrain_cron, schedules.timezone) == ("0 3 * * 0", "UTC")
    assert (schedules.robot_sensor_interval_seconds, schedules.feature_sensor_interval_seconds) == (60, 30)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"schedules.retrain_cron": "every sunday"}, "5-field cron"),
        ({"schedules.retrain_cron": "0 3 * *"}, "5-field cron"),
        ({"schedules.timezone": "Mars/Olympus"}, "IANA timezone"),
        ({"schedules.robot_sensor_interval_seconds": 0}, "greater than 0"),
    ],
)
def test_bad_schedule_values_fail_at_load(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert next(iter(overrides)) in str(info.value) and fragment in str(info.value)


def test_readme_run_queue_config_loads(tmp_path):
    """The dagster.yaml of the README's Operations section is a valid instance config."""
    operations = (REPO / "README.md").read_text().split("## Operations", 1)[1]
    (tmp_path / "dagster.yaml").write_text(textwrap.dedent(re.search(r"```yaml\n(.*?)```", operations, re.S).group(1)))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        queue = instance.get_concurrency_config().run_queue_config
        assert queue.max_concurrent_runs == 4 and queue.tag_concurrency_limits == [
            {"key": "bitmar/training", "limit": 1}
        ]


def test_gpu_steps_share_one_pool():
    pools = {key.to_user_string(): asset.op.pool for asset in ALL_ASSETS for key in asset.keys}
    in_pool = {name for name, pool in pools.items() if pool == GPU_POOL}
    assert in_pool == {"vision_features", "multimodal_pretrain", "reasoning_sft", "grpo_policy"}


def test_dagster_cli_validates_the_workspace():
    env = {k: v for k, v in os.environ.items() if k not in ("BITMAR_CONFIG", "DAGSTER_HOME")}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        env={**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout
    assert "All code locations passed validation" in done.stdout
    assert "Validation successful for code location bitmar." in done.stdout  # workspace.yaml location_name
    # The only warning allowed is dagster 1.13 announcing `dg check defs` as the command's successor.
    warnings = [
        line
        for line in done.stdout.splitlines()
        if ("Warning" in line or "WARNING" in line) and "definitions_validate_command" not in line
    ]
    assert warnings == []


def test_automation_featurizes_new_shards_and_retrains_on_robot_file_changes(tmp_path):
    """What the automation sensor would launch, evaluated tick by tick with Dagster's own
    evaluator: each new shard once; on a change of the robot files' content (observed as the
    source asset's data version) the robot tasks and everything downstream; nothing for a
    `touch` or a rewrite with the same bytes."""
    single, multi = generate_sample_robot_datasets(tmp_path / "robots", num_tasks=20)
    settings = _settings(
        tmp_path,
        **{"data.robot.source": "local", "data.robot.single_path": str(single), "data.robot.multi_path": str(multi)},
    )
    defs = build_definitions(settings)
    observe = dg.Definitions.merge(
        defs, dg.Definitions(jobs=[dg.define_asset_job("observe", selection=dg.AssetSelection.assets(ROBOT_FILES))])
    ).resolve_job_def("observe")
    resources = default_resources(settings)
    cursor = None

    def tick() -> dict[str, list]:
        nonlocal cursor
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
        cursor = result.cursor
        requested = {k.to_user_string(): result.get_requested_partitions(k) for k in defs.resolve_all_asset_keys()}
        # (Observations of the robot files are requested each cron minute: timing, not the subject here.)
        return {k: sorted(p or "-" for p in v) for k, v in requested.items() if v and k != ROBOT_FILES.path[0]}

    with dg.instance_for_test() as instance:
        assert tick() == {}
        assert dg.materialize(ALL_ASSETS, selection=["coco_raw"], instance=instance, resources=resources).success
        shards = instance.get_dynamic_partitions("coco_shards")
        assert tick() == {"image_caption_pairs": shards, "vision_features": shards}
        for shard in shards:
            assert dg.materialize(
                ALL_ASSETS, selection=FEATURES, instance=instance, resources=resources, partition_key=shard
            ).success
        assert observe.execute_in_process(instance=instance).success
        first = instance.get_latest_data_version_record(ROBOT_FILES, True)
        retrain = RETRAIN | {"robot_selection_tasks", "text_tokenizer"}
        assert set(tick()) == retrain  # the files' first version: ingest, then train in graph order
        assert dg.materialize(
            ALL_ASSETS, selection=["robot_selection_tasks", "text_tokenizer"], instance=instance, resources=resources
        ).success
        tick()  # the new tables ask for the training stages again: not what this test looks at

        os.utime(single, (time.time() + 100, time.time() + 100))  # newer mtime, same bytes
        multi.write_bytes(multi.read_bytes())
        assert observe.execute_in_process(instance=instance).success
        assert tick() == {}

        records = json.loads(single.read_text())
        records.append({**records[0], "input": "Task: Inspect a wind turbine blade."})
        single.write_text(json.dumps(records))
        assert observe.execute_in_process(instance=instance).success
        latest = instance.get_latest_data_version_record(ROBOT_FILES, True)
        assert latest.storage_id != first.storage_id
        assert set(tick()) == retrain

        single.unlink()
        assert not observe.execute_in_process(instance=instance, raise_on_error=False).success


def test_coco_raw_retries_a_transient_failure(tmp_path, monkeypatch):
    import dagster._core.definitions.policy as policy

    import assets.data

    real_fetch = assets.data.fetch_coco
    calls: list[int] = []

    def flaky_fetch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("connection reset by peer")
        return real_fetch(*args, **kwargs)

    delays: list[tuple[int, float]] = []
    real_delay = policy.calculate_delay

    def recorded_delay(attempt_num, backoff, jitter, base_delay):
        delays.append((attempt_num, real_delay(attempt_num, backoff, None, base_delay)))
        return 0.0  # the test does not wait the real 10 s

    monkeypatch.setattr(assets.data, "fetch_coco", flaky_fetch)
    monkeypatch.setattr(policy, "calculate_delay", recorded_delay)
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            ALL_ASSETS, selection=["coco_raw"], instance=instance, resources=default_resources(_settings(tmp_path))
        )
    assert result.success and len(calls) == 2
    assert [
        e.event_type_value for e in result.all_events if e.event_type_value in ("STEP_UP_FOR_RETRY", "STEP_RESTARTED")
    ] == ["STEP_UP_FOR_RETRY", "STEP_RESTARTED"]
    assert delays == [(1, 10.0)]  # then 30 s, 70 s: exponential


@pytest.mark.parametrize(
    "error",
    [
        VerificationError("train2017.zip: md5 mismatch"),
        AnnotationFileError("captions_train2017.json: line 1: not JSON"),
    ],
    ids=["checksum", "annotation-file"],
)
def test_coco_raw_fails_at_once_on_a_permanent_error(tmp_path, monkeypatch, error):
    import assets.data

    calls: list[int] = []

    def broken_fetch(*args, **kwargs):
        calls.append(1)
        raise error

    monkeypatch.setattr(assets.data, "fetch_coco", broken_fetch)
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            ALL_ASSETS,
            selection=["coco_raw"],
            instance=instance,
            resources=default_resources(_settings(tmp_path)),
            raise_on_error=False,
        )
    assert not result.success and len(calls) == 1
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert f"{type(error).__name__}: {error}" in failure.message


def test_backfill_of_all_shards_through_the_backfill_daemon(tmp_path):
    overrides = {"storage.root": str(tmp_path / "store"), **SMALL}
    location = write_location(tmp_path / "location.py", overrides)
    with synchronous_instance() as instance:
        assert dg.materialize(
            ALL_ASSETS,
            selection=["coco_raw"],
            instance=instance,
            resources=default_resources(BitmarSettings(overrides=overrides)),
        ).success
        shards = instance.get_dynamic_partitions("coco_shards")
        backfill_id = run_asset_backfill(instance, location, FEATURES, shards)

        runs = instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
        assert sorted(r.tags["dagster/partition"] for r in runs) == shards  # one run per shard
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        for key in FEATURES:
            assert instance.get_materialized_partitions(dg.AssetKey(key)) == set(shards)
    with duckdb.connect(str(tmp_path / "store" / "catalog.duckdb"), read_only=True) as con:
        assert con.execute("select count(*), count(distinct image_id) from vision_features").fetchone() == (12, 12)
        assert con.execute("select count(*) from image_caption_pairs").fetchone()[0] == 60


# A `bitmar run`-like materialization of one shard, in its own process, against the instance in
# $DAGSTER_HOME. It waits for the go file so all shards hit the storage at the same moment.
SHARD_RUN = """
import json, sys, time
from pathlib import Path
import dagster as dg
from assets.definitions import ALL_ASSETS, default_resources
from bitmar_pipeline.resources.settings import BitmarSettings
shard, go, overrides = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
resources = default_resources(BitmarSettings(overrides=overrides))
while not go.exists():
    time.sleep(0.01)
result = dg.materialize(ALL_ASSETS, selection=["image_caption_pairs", "vision_features"], partition_key=shard,
                        instance=dg.DagsterInstance.get(), resources=resources, raise_on_error=False)
sys.exit(0 if result.success else 1)
"""


def test_parallel_shard_runs_do_not_corrupt_the_catalog(tmp_path):
    overrides = {"storage.root": str(tmp_path / "store"), **SMALL}
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        assert dg.materialize(
            ALL_ASSETS,
            selection=["coco_raw"],
            instance=instance,
            resources=default_resources(BitmarSettings(overrides=overrides)),
        ).success
        shards = instance.get_dynamic_partitions("coco_shards")
        go = tmp_path / "go"
        env = {**os.environ, "DAGSTER_HOME": str(home), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", SHARD_RUN, shard, str(go), json.dumps(overrides)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for shard in shards
        ]
        go.touch()
        outputs = [w.communicate(timeout=300)[0] for w in workers]
        assert [w.returncode for w in workers] == [0] * len(shards), "\n".join(o[-2000:] for o in outputs)
        for key in FEATURES:
            assert instance.get_materialized_partitions(dg.AssetKey(key)) == set(shards)
        assert len(instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.SUCCESS]))) == 1 + len(shards)

    store = tmp_path / "store"
    files = sorted((store / "tables").rglob("*"))
    assert not [f for f in files if f.name.startswith(".tmp-")], "a temporary file was left behind"
    for path in (f for f in files if f.suffix == ".parquet"):
        pq.read_table(path)  # every file reads
    with duckdb.connect(str(store / "catalog.duckdb"), read_only=True) as con:
        assert con.execute("select count(*), count(distinct image_id) from vision_features").fetchone() == (12, 12)
        assert con.execute("select count(*), count(distinct caption_id) from image_caption_pairs").fetchone() == (
            60,
            60,
        )
        assert con.execute("select shard, count(*) from vision_features group by shard order by shard").fetchall() == [
            (s, 3) for s in shards
        ]
