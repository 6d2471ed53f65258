"""Shared test factories: the storage layout and release the release stages read, a fake Hub
API, generated COCO downloads, Dagster backfill helpers and the tiny training profile. A plain
module (not a test module), so test modules import it instead of each other."""

from __future__ import annotations

import io
import json
import logging
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pandas as pd
import torch
from PIL import Image

from bitmar_model.config import BitMarConfig
from bitmar_model.modeling import BitMarModel
from bitmar_pipeline.features.vision_encoder import TINY_RANDOM_FEATURE_DIM, build_tiny_random_encoder
from bitmar_pipeline.release.folder import VisionSpec, build_release
from bitmar_pipeline.release.quantization import build_quantization_report
from bitmar_pipeline.resources.settings import BitmarSettings
from bitmar_pipeline.storage import Storage
from bitmar_pipeline.text.tokenizer import train_bpe_tokenizer
from bitmar_pipeline.training.stages import GRPO, model_dir, publish_model
from tests.http_server import ServerState

REPO = Path(__file__).resolve().parents[1]
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}  # one process per run, not one per step

TINY = {
    "data.coco.sample_num_images": 60,
    "data.coco.shard_size": 30,
    "data.robot.source": "sample",
    "data.robot.sample_num_tasks": 60,
    "tokenizer.vocab_size": 600,
    "model.hidden_size": 32,
    "model.num_attention_heads": 2,
    "model.num_encoder_layers": 1,
    "model.num_decoder_layers": 1,
    "model.intermediate_size": 64,
    "model.max_seq_len": 64,
    "model.memory_dim": 32,
    "model.memory_slots": 8,
    "model.num_vision_tokens": 2,
    "model.projection_dim": 32,
    "training.knowledge_teacher": "",  # the teacher's distillation has its own tests (test_knowledge.py)
    "training.pretrain.max_steps": 6,
    "training.pretrain.warmup_steps": 1,
    "training.pretrain.batch_size": 8,
    "training.sft.max_steps": 6,
    "training.sft.warmup_steps": 1,
    "training.sft.batch_size": 4,
    "training.save_every_n_steps": 2,
    "training.log_every_n_steps": 2,
    "grpo_reasoning.steps": 2,
    "grpo_reasoning.group_size": 2,
    "grpo_reasoning.tasks_per_step": 2,
    "grpo_reasoning.max_new_tokens": 12,
    "evaluation.bootstrap_resamples": 100,
    "evaluation.max_caption_images": 4,
    "wandb.mode": "disabled",
    "carbon_tracking.enabled": False,
}


PATCH_GRID = 2


STEP = 7


TASKS = [
    ("Inspect underwater pipelines for leaks", ["Underwater Robot"], "test"),
    ("Survey a wide field from above", ["Drone"], "test"),
    ("Carry boxes up a staircase", ["Robot with Legs"], "test"),
    ("Deliver parcels across a flat warehouse floor", ["Robot with Wheels"], "validation"),
    ("Greet visitors at a hotel reception", ["Humanoid"], "train"),
    ("Map a coral reef and film fish", ["Underwater Robot", "Drone"], "train"),
]


EVALUATION = {
    "calibration": {"method": "platt", "a": 0.5, "b": 0.2, "fitted_on": "validation", "n": 3},
    "fleet": {
        robot: {"capabilities": [f"{robot.lower()} work"], "limitations": ["not this"], "environments": []}
        for robot in ("Drone", "Underwater Robot", "Humanoid", "Robot with Wheels", "Robot with Legs")
    },
    "robot_selection": {
        "test": {
            "n": 3,
            "majority": {"top1": {"value": 0.33, "ci95_low": 0.0, "ci95_high": 1.0, "n": 3}},
            "tfidf_logreg": {"top1": {"value": 0.5, "ci95_low": 0.0, "ci95_high": 1.0, "n": 3}},
            "bitmar_head": {"top1": {"value": 0.67, "ci95_low": 0.0, "ci95_high": 1.0, "n": 3}},
            "per_robot": {"Drone": {"precision": 1.0, "recall": 0.5}},
        }
    },
    "reasoning": {
        "test": {
            "format_compliance": {"value": 0.25, "ci95_low": 0.0, "ci95_high": 0.7, "n": 3},
            "stated_confidence_ece": 0.31,
        }
    },
}


# What evaluation_report records beside its report (assets/evaluation.py): hub_release reads it.
PASSED_CHECKS = [
    {"name": "test_head_top1", "passed": True, "value": 0.67, "threshold": 0.6, "direction": ">="},
    {"name": "head_confidence_calibrated", "passed": True, "value": 0.1, "threshold": 0.15, "direction": "<="},
]


def make_storage(root: Path, seed: int = 0) -> Storage:
    """A storage root with what the release stages read: the grpo_policy model (tiny, random),
    the tokenizer, a tiny-random DINOv2, the robot_tasks table, an evaluation report and a
    codecarbon CSV."""
    storage = Storage(root / ".bitmar")
    storage.ensure_writable()
    texts = [f"Task: {t}" for t, _, _ in TASKS] + ["<thinking> robot drone underwater wheels legs humanoid </thinking>"]
    tokenizer = train_bpe_tokenizer(texts * 3, 320, storage.path("tokenizer"), min_frequency=1)
    build_tiny_random_encoder(storage.path("models", "vision", "tiny-random"))
    config = BitMarConfig.tiny(
        vocab_size=len(tokenizer), vision_feature_dim=TINY_RANDOM_FEATURE_DIM, vision_num_patches=PATCH_GRID**2,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = BitMarModel(config)
    with torch.no_grad():  # a memory that is not the initial one, so saving it means something
        model.memory.write(torch.randn(3, config.memory_dim))
    publish_model(model, model_dir(storage, GRPO), {"stage": GRPO, "step": STEP, "fingerprint": "0123456789abcdef"})
    storage.write_partition(
        "robot_tasks",
        "all",
        pd.DataFrame(
            {
                "task_id": [f"t{i}" for i in range(len(TASKS))],
                "task_key": [t.lower() for t, _, _ in TASKS],
                "task_text": [t for t, _, _ in TASKS],
                "robots": [r for _, r, _ in TASKS],
                "split": [s for _, _, s in TASKS],
            }
        ),
    )
    storage.path("reports").mkdir()
    storage.path("reports", "evaluation_report.json").write_text(json.dumps(EVALUATION))
    storage.path("reports", "evaluation_checks.json").write_text(json.dumps({"checks": PASSED_CHECKS}))
    storage.path("emissions").mkdir()
    pd.DataFrame(
        {
            "project_name": ["multimodal_pretrain", "grpo_policy"],
            "duration": [12.0, 3.0],
            "emissions": [1e-5, 2e-6],
            "energy_consumed": [3e-5, 6e-6],
        }
    ).to_csv(storage.path("emissions", "emissions.csv"), index=False)
    return storage


def vision_spec(storage: Storage) -> VisionSpec:
    source = str(storage.path("models", "vision", "tiny-random"))
    return VisionSpec(model=source, source=source, revision=None, patch_grid=PATCH_GRID)


def settings_for(storage: Storage, **overrides) -> BitmarSettings:
    return BitmarSettings(
        overrides={
            "storage.root": str(storage.root),
            "vision.model": vision_spec(storage).source,
            "vision.patch_grid": PATCH_GRID,
            "data.robot.source": "sample",  # the factories' robot tables are generated, not the public files
            **overrides,
        }
    )


def make_release(root: Path) -> Storage:
    """make_storage plus the quantization report and the release folder."""
    storage = make_storage(root)
    build_quantization_report(storage, max_tasks=4, decode_tokens=8, latency_runs=2)
    build_release(storage, settings_for(storage).config, vision_spec(storage))
    return storage


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records the calls, fails `failures` times first."""

    instances: list[RecordingApi] = []
    failures: list[Exception] = []
    sleeps: list[float] = []  # the backoff delays, from a patched time.sleep

    def __init__(self, endpoint: str | None = None, token: str | None = None) -> None:
        self.endpoint, self.token, self.calls = endpoint, token, []
        RecordingApi.instances.append(self)

    def create_repo(self, repo_id: str, **kwargs) -> str:
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://hub.example/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        if RecordingApi.failures:
            raise RecordingApi.failures.pop(0)
        return type("CommitInfo", (), {"commit_url": f"https://hub.example/{kwargs['repo_id']}/commit/abc123"})()


def jpeg_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (seed * 40 % 256, 100, 50)).save(buffer, format="JPEG")
    return buffer.getvalue()


def publish_coco(server: ServerState) -> dict:
    """Serve a small annotations zip (train and val captions, plus a file that is not needed)
    and five JPEGs under /train2017/, with ids deliberately out of order."""
    ids = [42, 7, 19, 3, 25]
    images = [
        {
            "id": i,
            "file_name": f"{i:012d}.jpg",
            "width": 8,
            "height": 6,
            "coco_url": f"{server.base}/train2017/{i:012d}.jpg",
        }
        for i in ids
    ]
    captions = [
        {"id": 100 + n, "image_id": i, "caption": f"caption {n} of {i}"}
        for n, i in enumerate(ids * 2)
    ]
    train = {"info": {"year": 2017}, "licenses": [], "images": images, "annotations": captions}
    val = {"images": [], "annotations": []}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("annotations/captions_train2017.json", json.dumps(train))
        archive.writestr("annotations/captions_val2017.json", json.dumps(val))
        archive.writestr("annotations/instances_train2017.json", "{}")
    server.files["/annotations/annotations_trainval2017.zip"] = buffer.getvalue()
    for i in ids:
        server.files[f"/train2017/{i:012d}.jpg"] = jpeg_bytes(i)
    return train


@contextmanager
def workspace(instance: dg.DagsterInstance, location: Path):
    """The code location loaded in this process, as the daemon and webserver load it."""
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget

    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(
            executable_path=sys.executable, python_file=str(location), attribute="defs", working_directory=str(REPO)
        )
    )
    with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(origin)) as context:
        entry = next(iter(context.create_request_context().get_code_location_entries().values()))
        assert entry.load_error is None, entry.load_error
        yield context


def write_location(path: Path, overrides: dict) -> Path:
    path.write_text(
        "from assets.definitions import build_definitions\n"
        "from bitmar_pipeline.resources.settings import BitmarSettings\n"
        f"defs = build_definitions(BitmarSettings(overrides={overrides!r}))\n"
    )
    return path


def run_asset_backfill(
    instance: dg.DagsterInstance, location: Path, selection: list[str], partitions: list[str], timeout: float = 600
) -> str:
    """Launch an asset backfill as the UI does, then run the backfill daemon's iterations here
    until it is done. With the synchronous coordinator and launcher of the test instance, the
    runs it submits execute inside each iteration."""
    from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
    from dagster._core.utils import make_new_backfill_id
    from dagster._daemon.backfill import execute_backfill_iteration
    from dagster._time import get_current_timestamp

    with workspace(instance, location) as context:
        backfill = PartitionBackfill.from_asset_partitions(
            backfill_id=make_new_backfill_id(),
            asset_graph=context.create_request_context().asset_graph,
            partition_names=partitions,
            asset_selection=[dg.AssetKey(k) for k in selection],
            backfill_timestamp=get_current_timestamp(),
            tags={},
            dynamic_partitions_store=instance,
            all_partitions=False,
            title=None,
            description=None,
            run_config=IN_PROCESS,
        )
        instance.add_backfill(backfill)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for error in execute_backfill_iteration(context, logging.getLogger("bitmar.test.backfill")):
                assert error is None, error
            status = instance.get_backfill(backfill.backfill_id).status
            if status != BulkActionStatus.REQUESTED:
                assert status == BulkActionStatus.COMPLETED_SUCCESS, status
                return backfill.backfill_id
        raise AssertionError(f"backfill {backfill.backfill_id} not done after {timeout}s")


def synchronous_instance(**kwargs):
    return dg.instance_for_test(synchronous_run_coordinator=True, synchronous_run_launcher=True, **kwargs)
