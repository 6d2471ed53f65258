"""Operations on the asset graph: jobs, the retraining schedule, sensors and retry policies.

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

import hashlib
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from assets.partitions import coco_shards
from bitmar_model.io import sha256_file
from bitmar_pipeline.config import ScheduleConfig
from bitmar_pipeline.data.coco import manifest_shards
from bitmar_pipeline.resources.settings import BitmarSettings

# Downloads and uploads already retry requests inside (bitmar_pipeline.data.coco_download,
# bitmar_pipeline.resources.hub); this re-runs the whole step after 10s, 30s, 70s (+-10s jitter), which
# rides out an outage of minutes rather than seconds.
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

ROBOT_TASKS = dg.AssetKey("robot_selection_tasks")
VISION_FEATURES = dg.AssetKey("vision_features")
FEATURE_STAGES = dg.AssetSelection.assets("image_caption_pairs", "vision_features")
RETRAIN_STAGES = dg.AssetSelection.groups("training", "evaluation", "release")
# On every run that trains, so a QueuedRunCoordinator can allow one at a time (README, Operations).
TRAINING_TAGS = {"bitmar/training": "true"}

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


def _robot_dataset_sensor(interval: int) -> dg.SensorDefinition:
    @dg.sensor(
        name="robot_dataset_sensor",
        target=dg.AssetSelection.assets(ROBOT_TASKS) | RETRAIN_STAGES,
        minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.STOPPED,  # a change starts a retrain: opt in
        description="Hashes data.robot.single_path / multi_path (source: local); when their content changes, "
        "re-ingests robot_selection_tasks and retrains in one run. The first tick only records the hashes.",
    )
    def robot_dataset_sensor(
        context: dg.SensorEvaluationContext, settings: BitmarSettings
    ) -> dg.SensorResult | dg.SkipReason:
        files = robot_dataset_files(settings)
        if not files:
            return dg.SkipReason(
                f"data.robot.source is '{settings.config.data.robot.source}': only local files are watched"
            )
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            return dg.SkipReason(f"robot dataset file(s) not found: {', '.join(missing)}")
        # Content, not mtime: a copy or `touch` without a change must not retrain.
        hashes = {str(p): sha256_file(p) for p in files}
        cursor = json.dumps(hashes, sort_keys=True)
        if context.cursor is None:
            return dg.SensorResult(
                skip_reason=dg.SkipReason(f"recorded the content of {len(files)} file(s)"), cursor=cursor
            )
        if context.cursor == cursor:
            return dg.SkipReason("robot dataset files unchanged")
        previous = json.loads(context.cursor)
        changed = sorted(p for p, h in hashes.items() if previous.get(p) != h)
        run_key = hashlib.sha256(cursor.encode()).hexdigest()[:16]
        context.log.info(f"robot dataset changed: {changed}")
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=run_key,
                    tags={**TRAINING_TAGS, "bitmar/changed_files": ",".join(Path(p).name for p in changed)},
                )
            ],
            cursor=cursor,
        )

    return robot_dataset_sensor


def shards_to_extract(registered: Iterable[str], current: Iterable[str], materialized: Iterable[str]) -> list[str]:
    """Registered shards of the current manifest whose features were never materialized."""
    current_set, done = set(current), set(materialized)
    return [s for s in registered if s in current_set and s not in done]


def _coco_shard_sensor(interval: int) -> dg.SensorDefinition:
    @dg.sensor(
        name="coco_shard_sensor",
        job=feature_backfill,
        minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="One feature_backfill run per coco_shards partition that coco_raw registered and vision_features "
        "has not materialized yet (run_key = shard: a shard is requested once; re-run a failed one from the UI).",
    )
    def coco_shard_sensor(
        context: dg.SensorEvaluationContext, settings: BitmarSettings
    ) -> list[dg.RunRequest] | dg.SkipReason:
        registered = context.instance.get_dynamic_partitions(coco_shards.name)
        if not registered:
            return dg.SkipReason("no coco_shards registered yet: materialize coco_raw")
        try:
            current = manifest_shards(settings.storage)
        except FileNotFoundError:
            return dg.SkipReason(f"no COCO manifest under {settings.storage.root}: materialize coco_raw")
        # Stale shards (registered earlier, gone from the manifest) would fail: coco_raw already warns about them.
        todo = shards_to_extract(registered, current, context.instance.get_materialized_partitions(VISION_FEATURES))
        if not todo:
            return dg.SkipReason(f"all {len(current)} shards have vision_features")
        return [dg.RunRequest(run_key=shard, partition_key=shard) for shard in todo]

    return coco_shard_sensor


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


def build_sensors(config: ScheduleConfig) -> list[dg.SensorDefinition]:
    return [
        _robot_dataset_sensor(config.robot_sensor_interval_seconds),
        _coco_shard_sensor(config.feature_sensor_interval_seconds),
    ]
