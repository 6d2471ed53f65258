"""Hostile inputs: pickled payloads where checkpoints and releases are loaded, archive members
and dataset file names that point outside their root, and secrets that must never be written
anywhere (files under the storage root, the Dagster event log, stdout/stderr)."""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import shutil
import stat
import sys
import zipfile
from pathlib import Path

import dagster as dg
import pytest
import torch
from torch import nn

from assets.definitions import ALL_ASSETS, default_resources
from bitmar_model.checkpoint import STATE_FILE, load_latest_checkpoint, save_checkpoint
from bitmar_model.modeling import BitMarModel
from bitmar_pipeline.data.coco_sample import generate_sample_coco
from bitmar_pipeline.release.inference import PredictionError, load_predictor
from bitmar_pipeline.resources.settings import BitmarSettings
from bitmar_pipeline.storage import Storage
from tests.factories import (
    TINY,
    RecordingApi,
    jpeg_bytes,
    run_asset_backfill,
    synchronous_instance,
    write_location,
)


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def plant(path: Path, marker: Path, as_torch: bool) -> Path:
    """A file whose unpickling would create `marker`: torch.save's zip format, or a raw pickle."""
    state = {"step": 2, "optimizer": Payload(marker)}
    if as_torch:
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    return path


def test_planted_payload_is_live(tmp_path):
    """The control: a plain unpickler does run the payload, so the refusals below mean something."""
    marker = tmp_path / "control"
    pickle.loads(plant(tmp_path / "raw.pkl", marker, as_torch=False).read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("as_torch", [True, False], ids=["torch-zip", "raw-pickle"])
def test_checkpoint_trainer_state_is_never_unpickled(tmp_path, as_torch):
    model = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    config = {"stage": "test"}
    directory = tmp_path / "checkpoints" / "multimodal_pretrain" / "fingerprint"
    saved = save_checkpoint(directory, 2, model, optimizer, scheduler, {"position": 0}, config, device="cpu")
    marker = tmp_path / "pwned"
    plant(saved / STATE_FILE, marker, as_torch)

    with pytest.raises(ValueError, match=f"corrupt checkpoint state {saved / STATE_FILE}"):
        load_latest_checkpoint(directory, config)  # resume = load_latest_checkpoint, then restore()
    assert not marker.exists()


@pytest.fixture(scope="module")
def release(released: Storage) -> Path:
    """conftest's session-wide release; tests plant files only in copies of it."""
    return released.path("release")


def test_release_weights_are_never_unpickled(release, tmp_path):
    marker = tmp_path / "pwned"
    # A pickled pytorch_model.bin beside the safetensors weights is ignored.
    beside = tmp_path / "beside"
    shutil.copytree(release, beside)
    plant(beside / "pytorch_model.bin", marker, as_torch=True)
    BitMarModel.from_pretrained(str(beside))
    load_predictor(beside)

    # Only a pickled pytorch_model.bin: a local folder is read as safetensors only, and a Hub repo's
    # pytorch_model.bin fallback (huggingface_hub's _load_as_pickle) uses weights_only=True.
    only_pickle = tmp_path / "only_pickle"
    shutil.copytree(release, only_pickle)
    (only_pickle / "model.safetensors").unlink()
    planted = plant(only_pickle / "pytorch_model.bin", marker, as_torch=True)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        BitMarModel.from_pretrained(str(only_pickle))
    config = json.loads((release / "config.json").read_text())
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        BitMarModel._load_as_pickle(BitMarModel(config), str(planted), "cpu", True)
    with pytest.raises(PredictionError, match="model.safetensors is missing"):
        load_predictor(only_pickle)

    # A pickle under the safetensors name: not a safetensors header, and not the listed bytes.
    renamed = tmp_path / "renamed"
    shutil.copytree(release, renamed)
    plant(renamed / "model.safetensors", marker, as_torch=True)
    with pytest.raises(Exception, match="header|safetensors"):
        BitMarModel.from_pretrained(str(renamed))
    with pytest.raises(PredictionError, match="do not match"):
        load_predictor(renamed)
    assert not marker.exists()


# Paths opened by this process since the hook was installed, among the watched ones. Audit hooks
# cannot be removed, so the hook only ever looks at this set.
_WATCHED: set[str] = set()
_OPENED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _WATCHED and isinstance(args[0], str | bytes | os.PathLike):
        path = os.path.realpath(os.fsdecode(args[0]))
        if path in _WATCHED:
            _OPENED.append(path)


sys.addaudithook(_audit)


@pytest.fixture
def watch_opens():
    def watch(*paths: Path) -> list[str]:
        _WATCHED.update(os.path.realpath(p) for p in paths)
        return _OPENED

    yield watch
    _WATCHED.clear()
    _OPENED.clear()


def test_dataset_file_names_cannot_leave_the_dataset_root(tmp_path, watch_opens):
    root = generate_sample_coco(tmp_path / "data" / "coco", num_images=4, image_size=32)
    secrets = [tmp_path / "data" / "secret.jpg", tmp_path / "secret.jpg"]
    for secret in secrets:
        secret.write_bytes(jpeg_bytes(1))
    annotations = root / "annotations" / "captions_train2017.json"
    data = json.loads(annotations.read_text())
    hostile = {101: "../../secret.jpg", 102: str(secrets[1]), 103: "../../../secret.jpg"}
    for image_id, name in hostile.items():
        data["images"].append({"id": image_id, "file_name": name, "width": 8, "height": 6})
        data["annotations"].append(
            {"id": 9000 + image_id, "image_id": image_id, "caption": "a caption that must never be paired"}
        )
    annotations.write_text(json.dumps(data))
    opened = watch_opens(*secrets)

    settings = BitmarSettings(
        overrides={
            "storage.root": str(tmp_path / "store"),
            "data.coco.source": "local",
            "data.coco.root": str(root),
            "data.coco.shard_size": 10,
        }
    )
    with dg.instance_for_test() as instance:
        resources = default_resources(settings)
        assert dg.materialize(ALL_ASSETS, selection=["coco_raw"], instance=instance, resources=resources).success
        for shard in instance.get_dynamic_partitions("coco_shards"):
            assert dg.materialize(
                ALL_ASSETS,
                selection=["image_caption_pairs", "vision_features"],
                partition_key=shard,
                instance=instance,
                resources=resources,
            ).success
    storage = settings.storage
    refused = storage.read_quarantine("coco_raw").query("reason == 'unsafe_file_name'")
    assert sorted(int(d.split(":")[0].removeprefix("image ")) for d in refused["detail"]) == sorted(hostile)
    assert not set(hostile) & set(storage.read_table("image_caption_pairs")["image_id"])
    assert opened == [], f"opened outside the dataset root: {opened}"


def error_chain(error) -> str:
    """The messages of a step failure and its causes (after retries, the first says only
    'Exceeded max_retries of 3')."""
    messages = []
    while error is not None:
        messages.append(error.message)
        error = error.cause
    return "\n".join(messages)


def _hostile_zip(captions: dict, symlink: bool) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        if symlink:  # the captions member is a symlink to a file outside the target folder
            info = zipfile.ZipInfo("annotations/captions_train2017.json")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "../../../../../../etc/passwd")
        else:
            archive.writestr("annotations/captions_train2017.json", json.dumps(captions))
        archive.writestr("../../escaped.txt", "written outside the folder")
    return buffer.getvalue()


def test_coco_download_refuses_escaping_archives_and_file_names(tmp_path, monkeypatch, server):
    """Through coco_raw's download path (the unit tests are in test_coco_download.py)."""
    import dagster._core.definitions.policy as policy

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(policy, "calculate_delay", lambda **kwargs: 0.0)  # coco_raw retries; do not wait for it
    images = [
        {"id": 1, "file_name": "000000000001.jpg", "coco_url": f"{server.base}/train2017/1.jpg"},
        {"id": 2, "file_name": "../../../pwned.jpg", "coco_url": f"{server.base}/train2017/2.jpg"},
    ]
    captions = {
        "images": images,
        "annotations": [{"id": 10 + i, "image_id": i, "caption": f"caption {i}"} for i in (1, 2)],
    }
    server.files["/train2017/1.jpg"] = server.files["/train2017/2.jpg"] = jpeg_bytes(3)
    settings = BitmarSettings(
        overrides={
            "storage.root": str(tmp_path / "a" / "b" / "store"),
            "data.coco.source": "download",
            "data.coco.max_images": 2,
            "data.coco.annotations_url": f"{server.base}/annotations.zip",
        }
    )
    with dg.instance_for_test() as instance:
        server.files["/annotations.zip"] = _hostile_zip(captions, symlink=True)
        refused = dg.materialize(
            ALL_ASSETS,
            selection=["coco_raw"],
            instance=instance,
            resources=default_resources(settings),
            raise_on_error=False,
        )
        assert not refused.success
        failure = next(e for e in refused.all_events if e.is_step_failure)
        assert "is a symbolic link; refusing to extract" in error_chain(failure.step_failure_data.error)

        server.files["/annotations.zip"] = _hostile_zip(captions, symlink=False)
        (tmp_path / "a" / "b" / "store" / "raw" / "coco-download" / "downloads" / "annotations.zip").unlink()
        assert dg.materialize(
            ALL_ASSETS, selection=["coco_raw"], instance=instance, resources=default_resources(settings)
        ).success
    assert not list(tmp_path.rglob("escaped.txt")) and not list(tmp_path.rglob("pwned.jpg"))
    # With max_images the download keeps only valid entries, so image 2 never reaches the layout.
    assert settings.storage.read_table("coco_images")["image_id"].tolist() == [1]


HF_SECRET = "hf_PLANTEDhubtoken7f3c9a1e5b2d8c4f6a0e"
WANDB_SECRET = "f00dfacef00dfacef00dPLANTEDwandbkey12345"  # 40 characters, like a real key


def test_secrets_never_written_during_the_full_pipeline(tmp_path, monkeypatch, capfd):
    """The whole graph, launched as a `full_pipeline` backfill over every shard (what the UI
    does), with W&B offline, codecarbon on and the Hub upload enabled against a recording
    HfApi. Neither planted secret may appear in any file, event or output."""
    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    RecordingApi.instances, RecordingApi.failures = [], []
    monkeypatch.setattr("bitmar_pipeline.resources.hub.HfApi", RecordingApi)
    store = tmp_path / "store"
    overrides = {
        **TINY, "storage.root": str(store), "wandb.mode": "offline", "carbon_tracking.enabled": True,
        "huggingface_hub.enabled": True, "huggingface_hub.repo_id": "someone/bitmar-secret-test",
        "huggingface_hub.require_passing_checks": False,  # the tiny model fails the thresholds: release anyway
    }
    location = write_location(tmp_path / "location.py", overrides)
    with synchronous_instance() as instance:
        assert dg.materialize(
            ALL_ASSETS,
            selection=["coco_raw"],
            instance=instance,
            resources=default_resources(BitmarSettings(overrides=overrides)),
        ).success
        shards = instance.get_dynamic_partitions("coco_shards")
        backfill_id = run_asset_backfill(
            instance, location, [a.key.to_user_string() for a in ALL_ASSETS], shards, timeout=900
        )
        runs = instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        assert sorted(r.tags.get("dagster/partition", "-") for r in runs).count("-") >= 2  # unpartitioned stages once
        assert instance.get_materialized_partitions(dg.AssetKey("vision_features")) == set(shards)
        assert instance.get_latest_materialization_event(dg.AssetKey("hub_release")) is not None
        events = [str(e) for r in instance.get_runs() for e in instance.all_logs(r.run_id)]
    (api,) = RecordingApi.instances
    assert api.token == HF_SECRET and [c[0] for c in api.calls] == [
        "create_repo",
        "upload_folder",
    ]  # the token did reach the Hub client

    out, err = capfd.readouterr()
    wandb_files = list((store / "wandb").rglob("*"))
    assert any(p.suffix == ".wandb" for p in wandb_files), "W&B offline run files expected"
    assert list((store / "emissions").glob("*.csv")) and (store / "release" / "README.md").is_file()
    leaks = [str(p) for p in store.rglob("*") if p.is_file() and _contains_secret(p.read_bytes())]
    leaks += [f"event: {e[:200]}" for e in events if HF_SECRET in e or WANDB_SECRET in e]
    leaks += [name for name, text in (("stdout", out), ("stderr", err)) if HF_SECRET in text or WANDB_SECRET in text]
    assert leaks == []


def _contains_secret(data: bytes) -> bool:
    # Raw bytes, so binary files count too (W&B's .wandb run files are protobuf records).
    return any(s.encode(enc) in data for s in (HF_SECRET, WANDB_SECRET) for enc in ("utf-8", "utf-16-le"))
