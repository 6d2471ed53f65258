"""Operations on the asset graph: jobs, the retraining schedule, declarative automation and retry policies.

Assets are referred to by key and group name, not imported: assets/data.py and
assets/release.py import NETWORK_RETRY from here, so importing them back would be circular.

Why `full_pipeline` is one job over every asset: Dagster (1.13) lets an asset job mix
unpartitioned assets with assets of ONE partitions definition; the job then carries
`coco_shards`. Launched from the UI over its partitions it becomes an asset backfill, which
runs coco_raw, robot_selection_tasks and the training stages once and the two partitioned
stages once per shard, in graph order. (A plain job run for a single partition would rerun
the unpartitioned stages for every shard, so the README points people at the backfill.)
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from assets.versions import content_version
from bitmar_model.io import sha256_file
from bitmar_pipeline.config import ScheduleConfig
from bitmar_pipeline.resources.settings import BitmarSettings

# Downloads already retry requests inside (bitmar_pipeline.data.coco_download); this re-runs the whole
# coco_raw step after 10s, 30s, 70s (+-10s jitter), which rides out an outage of minutes rather than
# seconds. Uploads have one retry layer, the Hub resource's own (bitmar_pipeline.resources.hub).
NETWORK_RETRY = dg.RetryPolicy(max_retries=3, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)


@contextmanager
def fail_without_retry(*permanent: type[BaseException]) -> Iterator[None]:
    """Errors of these types fail the step at once: a re-run cannot fix bytes that differ from
    the published ones or a bad config or file, so waiting out NETWORK_RETRY (~110 s) only
    delays the message."""
    try:
        yield
    except permanent as error:
        raise dg.Failure(description=f"{type(error).__name__}: {error}", allow_retries=False) from error

ROBOT_FILES = dg.AssetKey("robot_dataset_files")
AUTOMATION_SENSOR = "bitmar_automation"
# Declarative automation (evaluated by the automation sensor, which is created stopped):
# each shard that coco_raw registers is featurized once; the rest follows its upstream.
NEW_SHARDS = dg.AutomationCondition.on_missing()
UPSTREAM_CHANGED = dg.AutomationCondition.eager()
FEATURE_STAGES = dg.AssetSelection.assets("image_caption_pairs", "vision_features")
RETRAIN_STAGES = dg.AssetSelection.groups("training", "evaluation", "release")
# On every run that trains, so a QueuedRunCoordinator can allow one at a time (README, Operations).
TRAINING_TAGS = {"bitmar/training": "true"}
# The steps that hold a GPU (encoding, training): a Dagster pool, limited per deployment with
# `dagster instance concurrency set gpu N` or concurrency.pools in dagster.yaml (README, Operations).
GPU_POOL = "gpu"

full_pipeline = dg.define_asset_job(
    "full_pipeline",
    selection=dg.AssetSelection.all(),
    description="Every asset. Launch it over all coco_shards partitions (a backfill): unpartitioned stages run once, "
    "image_caption_pairs and vision_features once per shard. Materialize coco_raw first so the shards exist.",
)
retrain = dg.define_asset_job(
    "retrain",
    selection=RETRAIN_STAGES,
    run_tags=TRAINING_TAGS,
    description="Training stages, evaluation, quantization and release, from the data already in storage.",
)
feature_backfill = dg.define_asset_job(
    "feature_backfill",
    selection=FEATURE_STAGES,
    description="image_caption_pairs and vision_features for one coco_shards partition per run.",
)
JOBS = [full_pipeline, retrain, feature_backfill]


def robot_dataset_files(settings: BitmarSettings) -> list[Path]:
    """The local robot dataset files the profile points at (none for sample or url sources)."""
    robot = settings.config.data.robot
    if robot.source != "local":
        return []
    return [Path(p).expanduser() for p in (robot.single_path, robot.multi_path) if p]


def robot_files_version(settings: BitmarSettings) -> dg.DataVersion:
    """Local files: their content (SHA-256, so a `touch` or a copy of the same bytes changes
    nothing). Sample and url sources: the settings that determine the tables."""
    files = robot_dataset_files(settings)
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise dg.Failure(f"robot dataset file(s) not found: {', '.join(missing)}", allow_retries=False)
    if files:
        return content_version(*(f"{p.name}:{sha256_file(p)}" for p in files))
    return content_version(json.dumps(settings.config.data.robot.model_dump(mode="json"), sort_keys=True))


def _minutes_cron(seconds: int) -> str:
    minutes = max(1, round(seconds / 60))
    return "* * * * *" if minutes == 1 else f"*/{minutes} * * * *"


def build_robot_files_asset(config: ScheduleConfig) -> dg.SourceAsset:
    """The robot dataset files as an observable source asset: its data version is their content
    hash, observed by the automation sensor every schedules.robot_sensor_interval_seconds
    (rounded to whole minutes)."""

    # Observable source assets are the documented way to version external files; the decorator
    # is marked beta in dagster 1.13, a warning that says nothing to users of this pipeline.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        return _robot_files_asset(_minutes_cron(config.robot_sensor_interval_seconds))


def _robot_files_asset(cron: str) -> dg.SourceAsset:
    @dg.observable_source_asset(
        key=ROBOT_FILES,
        group_name="data",
        required_resource_keys={"settings"},
        automation_condition=dg.AutomationCondition.cron_tick_passed(cron),
        description="data.robot.single_path / multi_path (source: local; otherwise the sample/url settings). "
        "Data version: SHA-256 of their content; a new version makes robot_selection_tasks and the "
        "training stages eligible for automation.",
    )
    def robot_dataset_files(context) -> dg.DataVersion:
        return robot_files_version(context.resources.settings)

    return robot_dataset_files


def build_automation_sensors(config: ScheduleConfig) -> list[dg.SensorDefinition]:
    """One automation condition sensor over every asset, created stopped (turn it on in
    Automation). It evaluates the conditions on the assets (assets/data.py, assets/training.py,
    ...): observe the robot files; featurize each new shard once; re-ingest the robot tasks when
    the files change and retrain (training, evaluation, release) when robot data or features do."""
    return [
        dg.AutomationConditionSensorDefinition(
            AUTOMATION_SENSOR,
            target=dg.AssetSelection.all() | dg.AssetSelection.assets(ROBOT_FILES),
            default_status=dg.DefaultSensorStatus.STOPPED,  # a change starts a retrain: opt in
            minimum_interval_seconds=config.feature_sensor_interval_seconds,
            description=(
                "Declarative automation of the BitMar graph: featurize new shards, retrain when robot data or "
                "features change. Created stopped."
            ),
        )
    ]


def build_schedules(config: ScheduleConfig) -> list[dg.ScheduleDefinition]:
    return [
        dg.ScheduleDefinition(
            name="retrain_schedule",
            job=retrain,
            cron_schedule=config.retrain_cron,
            execution_timezone=config.timezone,
            default_status=dg.DefaultScheduleStatus.STOPPED,  # nobody trains by accident
            description=(
                f"Runs `retrain` at '{config.retrain_cron}' ({config.timezone}); "
                "schedules.retrain_cron / schedules.timezone."
            ),
        )
    ]
