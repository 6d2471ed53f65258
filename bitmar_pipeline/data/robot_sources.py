"""robot_selection_tasks: choose the robot files by `data.robot.source` and ingest them."""

from __future__ import annotations

import gzip
from pathlib import Path
from urllib.parse import urlparse

from bitmar_model.io import atomic_write_bytes, sha256_file
from bitmar_pipeline.config import ConfigError, PipelineConfig
from bitmar_pipeline.data.coco_download import VerificationError, download_file
from bitmar_pipeline.data.robot_sample import generate_sample_robot_datasets
from bitmar_pipeline.data.robot_tasks import RobotIngestResult, ingest_robot_datasets
from bitmar_pipeline.storage import Storage

ROBOT_TASKS_TABLE = "robot_tasks"
ROBOT_SUBTASKS_TABLE = "robot_subtasks"
BUNDLED_DIR = Path(__file__).resolve().parent / "robot_selection"
# The public files as pinned in robot_selection/SOURCE.md; a bundled copy that differs is refused.
BUNDLED_SHA256 = {
    "single_robot_selection.json": "eb3eebd3140e3067cd49f334a5f969ce5ca47c5ad5b84a43381fe5770110158a",
    "multi_robot_selection_dataset.json": "fa951f8d837ea19ed642d7a666cfdae26ef5262fce84bd7e4d9629a0853a55e4",
}


def bundled_robot_files(folder: Path) -> tuple[Path, Path]:
    """(single file, multi file): the public robot data shipped with the package (MIT, gzip),
    decompressed into `folder` once; each file's SHA-256 is checked against the pinned one."""
    paths = []
    for name, digest in BUNDLED_SHA256.items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != digest:
            archive = BUNDLED_DIR / f"{name}.gz"
            try:
                atomic_write_bytes(path, gzip.decompress(archive.read_bytes()))
            except (OSError, EOFError) as error:
                raise ConfigError(f"data.robot.source bundled: cannot read {archive}: {error}") from error
            _check_sha256(path, digest, f"data.robot.source bundled: {archive}")
        paths.append(path)
    return paths[0], paths[1]


def robot_files(config: PipelineConfig, storage: Storage) -> tuple[Path | None, Path | None]:
    """(single file, multi file) for the configured source, fetched or generated as needed."""
    robot = config.data.robot
    if robot.source == "sample":
        return generate_sample_robot_datasets(
            storage.path("raw", "robots-sample"), num_tasks=robot.sample_num_tasks, seed=robot.sample_seed
        )
    if robot.source == "bundled":
        return bundled_robot_files(storage.path("raw", "robots-bundled"))
    paths: list[Path | None] = []
    for key, value in (("single_path", robot.single_path), ("multi_path", robot.multi_path)):
        if value is None:
            paths.append(None)
        elif robot.source == "url":
            kind = key.removesuffix("_path")
            paths.append(fetch_verified(value, getattr(robot, f"{kind}_sha256"), storage, label=f"data.robot.{key}"))
        else:
            path = Path(value).expanduser()
            if not path.is_file():
                raise ConfigError(f"data.robot.{key}: {path} is not a file")
            paths.append(path)
    return paths[0], paths[1]


def fetch_verified(url: str, sha256: str | None, storage: Storage, *, label: str) -> Path:
    """Download url once into <storage.root>/raw/robots-url/<sha256[:16]>/<file name> and check its SHA-256.

    A cached file is re-hashed (the files are small) and fetched again when it does not match; a
    download that does not match is deleted and raises VerificationError naming the setting, the
    URL and both digests, so nothing unverified is ingested."""
    name = Path(urlparse(url).path).name or "robots.json"
    folder = storage.path("raw", "robots-url", *([sha256.lower()[:16]] if sha256 else []))
    dest = folder / name
    if dest.is_file() and sha256 and sha256_file(dest) != sha256.lower():
        dest.unlink()
    path = download_file(url, dest, expected_size=None, expected_md5=None)
    if sha256:
        _check_sha256(path, sha256.lower(), f"{label}: {name} from {url}")
    return path


def _check_sha256(path: Path, expected: str, what: str) -> None:
    """Delete `path` and raise VerificationError naming `what` when its SHA-256 is not `expected`."""
    if (actual := sha256_file(path)) != expected:
        path.unlink()
        raise VerificationError(
            f"{what}: SHA-256 mismatch: expected {expected}, got {actual}; the file was deleted and not ingested"
        )


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
