"""robot_selection_tasks: choose the robot files by `data.robot.source` and ingest them."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from bitmar_pipeline.config import ConfigError, PipelineConfig
from bitmar_pipeline.data.coco_download import download_file
from bitmar_pipeline.data.robot_sample import generate_sample_robot_datasets
from bitmar_pipeline.data.robot_tasks import RobotIngestResult, ingest_robot_datasets
from bitmar_pipeline.storage import Storage

ROBOT_TASKS_TABLE = "robot_tasks"
ROBOT_SUBTASKS_TABLE = "robot_subtasks"


def robot_files(config: PipelineConfig, storage: Storage) -> tuple[Path | None, Path | None]:
    """(single file, multi file) for the configured source, fetched or generated as needed."""
    robot = config.data.robot
    if robot.source == "sample":
        return generate_sample_robot_datasets(
            storage.path("raw", "robots-sample"), num_tasks=robot.sample_num_tasks, seed=robot.sample_seed
        )
    paths: list[Path | None] = []
    for key, value in (("single_path", robot.single_path), ("multi_path", robot.multi_path)):
        if value is None:
            paths.append(None)
        elif robot.source == "url":
            name = Path(urlparse(value).path).name or f"{key}.json"
            paths.append(
                download_file(value, storage.path("raw", "robots-url", name), expected_size=None, expected_md5=None)
            )
        else:
            path = Path(value).expanduser()
            if not path.is_file():
                raise ConfigError(f"data.robot.{key}: {path} is not a file")
            paths.append(path)
    return paths[0], paths[1]


def load_robot_tables(config: PipelineConfig, storage: Storage) -> tuple[RobotIngestResult, dict[str, str]]:
    """Ingest the configured robot data; also returns {kind: file} for the asset metadata."""
    single, multi = robot_files(config, storage)
    result = ingest_robot_datasets(
        single,
        multi,
        split_fractions=config.data.robot.split_fractions,
        split_seed=config.data.robot.split_seed,
        source_name="sample" if config.data.robot.source == "sample" else None,
        cv_fold=config.data.robot.cv_fold,
    )
    return result, {kind: str(path) for kind, path in (("single", single), ("multi", multi)) if path is not None}
