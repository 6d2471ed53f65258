"""data.robot.source: url (configs/coco.yaml): the pinned robot files served from 127.0.0.1, verified by SHA-256."""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from bitmar_pipeline.config import ConfigError, build_config, load_config
from bitmar_pipeline.data.coco_download import VerificationError
from bitmar_pipeline.data.robot_sources import load_robot_tables, robot_files
from bitmar_pipeline.storage import Storage
from tests.http_server import ServerState

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


def _coco_robot_settings() -> dict:
    return yaml.safe_load((REPO / "configs" / "coco.yaml").read_text())["data"]["robot"]


def _served(server: ServerState, robot: dict, files: dict[str, bytes]) -> dict:
    """robot settings with each URL's host replaced by the local server, which serves `files` by name."""
    local = dict(robot)
    for kind in ("single", "multi"):
        path = urlsplit(robot[f"{kind}_path"]).path
        server.files[path] = files[Path(path).name]
        local[f"{kind}_path"] = server.base + path
    return local


def _config(robot: dict, storage_root: Path):
    return build_config({"storage": {"root": str(storage_root)}, "data": {"robot": robot}})


def test_coco_profile_names_no_path_outside_the_repository():
    robot = _coco_robot_settings()
    assert robot["source"] == "url"
    for kind in ("single", "multi"):
        assert urlsplit(robot[f"{kind}_path"]).scheme == "https"
        assert len(robot[f"{kind}_sha256"]) == 64
    assert "../" not in (REPO / "configs" / "coco.yaml").read_text()


def test_url_source_requires_the_digests(tmp_path: Path):
    robot = {"source": "url", "single_path": "http://127.0.0.1/x/single.json"}
    with pytest.raises(ConfigError, match="single_sha256"):
        build_config({"data": {"robot": robot}})


def test_pinned_files_are_verified_ingested_and_cached(server: ServerState, robot_data: Path, tmp_path: Path):
    files = {p.name: p.read_bytes() for p in robot_data.glob("*.json")}
    config = _config(_served(server, _coco_robot_settings(), files), tmp_path / "store")
    storage = Storage(config.storage.root)
    result, sources = load_robot_tables(config, storage)
    assert len(result.tasks) > 0
    for path in sources.values():
        assert Path(path).is_relative_to(storage.path("raw", "robots-url"))
    requests_before = len(server.requests)
    robot_files(config, storage)  # cached: verified again, not fetched again
    assert len(server.requests) == requests_before


def test_digest_mismatch_is_refused_naming_the_file(server: ServerState, tmp_path: Path):
    good, bad = b'[{"instruction": "x"}]', b'[{"instruction": "tampered"}]'
    robot = {
        "source": "url",
        "single_path": "https://example.org/pinned/single_robot_selection.json",
        "single_sha256": hashlib.sha256(good).hexdigest(),
    }
    served = _served_single(server, robot, bad)
    config = _config(served, tmp_path / "store")
    storage = Storage(config.storage.root)
    with pytest.raises(VerificationError) as excinfo:
        robot_files(config, storage)
    message = str(excinfo.value)
    assert "data.robot.single_path" in message and "single_robot_selection.json" in message
    assert "SHA-256 mismatch" in message and hashlib.sha256(bad).hexdigest() in message
    assert not list(storage.path("raw", "robots-url").rglob("single_robot_selection.json"))


def _served_single(server: ServerState, robot: dict, body: bytes) -> dict:
    path = urlsplit(robot["single_path"]).path
    server.files[path] = body
    return {**robot, "single_path": server.base + path}


def test_coco_profile_loads():
    config = load_config(REPO / "configs" / "coco.yaml")
    assert config.data.robot.source == "url"


def test_the_sample_profile_ingests_the_bundled_public_files(tmp_path: Path):
    """data.robot.source: bundled (the sample profile): the shipped gzip files decompress to the
    pinned public files (the same digests the coco profile downloads), ingested with no network."""
    from bitmar_pipeline.data.robot_sources import BUNDLED_DIR, BUNDLED_SHA256

    config = load_config(None, {"storage.root": str(tmp_path)})
    assert config.data.robot.source == "bundled"
    robot = _coco_robot_settings()
    assert sorted(BUNDLED_SHA256.values()) == sorted((robot["single_sha256"], robot["multi_sha256"]))
    result, files = load_robot_tables(config, Storage(tmp_path))
    # 500 rows read; 12 exact duplicates quarantined; 244 distinct tasks, as in ../shared/data
    assert sum(result.input_rows.values()) == 500 == len(result.tasks) + len(result.quarantine)
    assert set(result.quarantine["reason"]) == {"duplicate"} and result.tasks["task_key"].nunique() == 244
    assert set(result.tasks["split"]) == {"train", "validation", "test"}
    single = Path(files["single"])
    assert hashlib.sha256(single.read_bytes()).hexdigest() == BUNDLED_SHA256[single.name]
    assert (BUNDLED_DIR / "LICENSE").read_text().startswith("MIT License")

    single.write_text("[]")  # a damaged copy is replaced from the package, not ingested
    again, _ = load_robot_tables(config, Storage(tmp_path))
    assert again.tasks.equals(result.tasks)
