"""Distributed training through Dagster Pipes: the torchrun command, the result that travels
back, and multimodal_pretrain materialized with compute.nproc_per_node=2 (two gloo ranks on CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch.distributed as dist

from assets.definitions import ALL_ASSETS, default_resources
from bitmar_model.checkpoint import load_latest_checkpoint
from bitmar_pipeline.cli import main
from bitmar_pipeline.resources.settings import BitmarSettings
from bitmar_pipeline.training.launch import (
    build_torchrun_command,
    materialization_metadata,
    result_from_payload,
    result_payload,
    torchrun_env,
)
from bitmar_pipeline.training.stages import GRPO, HISTORY_FILE, PRETRAIN, StageResult

TINY = {
    "data.coco.sample_num_images": 60,
    "data.coco.shard_size": 60,
    "data.robot.source": "sample",
    "data.robot.sample_num_tasks": 40,
    "tokenizer.vocab_size": 600,
    "model.hidden_size": 32,
    "model.num_attention_heads": 2,
    "model.num_encoder_layers": 1,
    "model.num_decoder_layers": 1,
    "model.intermediate_size": 64,
    "model.memory_dim": 32,
    "model.memory_slots": 8,
    "model.num_vision_tokens": 2,
    "model.projection_dim": 32,
    "training.knowledge_teacher": "",  # the teacher's distillation has its own tests (test_knowledge.py)
    "training.pretrain.max_steps": 4,
    "training.pretrain.warmup_steps": 1,
    "training.pretrain.batch_size": 4,
    "training.log_every_n_steps": 1,
    "wandb.mode": "disabled",
    "carbon_tracking.enabled": False,
}
DATA_ASSETS = "coco_raw,image_caption_pairs,vision_features,robot_selection_tasks,text_tokenizer"


def test_torchrun_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("profile.yaml").write_text("wandb: {mode: disabled}\n")
    settings = BitmarSettings(config_file="profile.yaml", overrides={"storage.root": "store", "model.hidden_size": 32})
    command = build_torchrun_command(
        PRETRAIN, settings, 2, encoder_fingerprint="enc123", shards=["s0", "s1"], wandb_run_name="pretrain-ab"
    )
    assert command[:9] == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "bitmar_pipeline.training.launch", "--stage",
    ]
    options = dict(zip(command[8::2], command[9::2], strict=True))
    assert options["--stage"] == PRETRAIN
    assert (
        options["--encoder-fingerprint"] == "enc123"
        and options["--shards"] == "s0,s1"
        and options["--wandb-run-name"] == "pretrain-ab"
    )
    # Relative paths are pinned, so the ranks' working directory does not matter.
    assert json.loads(options["--settings-json"]) == {
        "config_file": str(Path("profile.yaml").resolve()),
        "overrides": {"storage.root": str(Path("store").resolve()), "model.hidden_size": 32},
    }
    with pytest.raises(ValueError, match="GRPO runs in one process"):
        build_torchrun_command(GRPO, settings, 2)


def test_torchrun_env_splits_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert torchrun_env(2, cores=16) == {"OMP_NUM_THREADS": "8", "OMP_WAIT_POLICY": "PASSIVE"}
    assert torchrun_env(4, cores=2)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # an explicit setting wins
    assert torchrun_env(2, cores=16)["OMP_NUM_THREADS"] == "3"


def test_stage_result_survives_the_trip_through_json(tmp_path: Path) -> None:
    table = pd.DataFrame(
        {"task": ["fly over", "dive"], "correct": [True, False], "score": [np.float32(0.5), np.float32(0.25)]}
    )
    result = StageResult(
        PRETRAIN, tmp_path / "model", "fp", 4, None, [{"step": 1, "train/loss": np.float32(2.5)}],
        {"recall@1": np.float64(0.123456), "images": np.int64(60), "note": "x"}, 1.5, {"validation": table},
    )
    payload = json.loads(json.dumps(result_payload(result)))  # what Pipes writes and reads
    back = result_from_payload(payload)
    assert (back.model_dir, back.final_step, back.resumed_from_step, back.metrics["images"]) == (
        tmp_path / "model",
        4,
        None,
        60,
    )
    assert back.history == [{"step": 1, "train/loss": 2.5}]
    pd.testing.assert_frame_equal(back.tables["validation"], table, check_dtype=False)
    reported = materialization_metadata(result, world_size=2)
    assert reported["model_dir"] == {"raw_value": str(tmp_path / "model"), "type": "path"}
    assert (reported["final_step"], reported["world_size"], reported["recall@1"]) == (4, 2, 0.1235)
    assert "note" not in reported


def _metadata(result: dg.ExecuteInProcessResult, key: str) -> dict[str, object]:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(key)]
    return {name: value.value for name, value in event.step_materialization_data.materialization.metadata.items()}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)
def test_pretrain_under_torchrun_reports_through_pipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # both ranks share the machine with whatever else runs
    assert (
        main(["run", "--select", DATA_ASSETS, *[a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]])
        == 0
    )

    settings = BitmarSettings(overrides={**TINY, "compute.nproc_per_node": 2})
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            ALL_ASSETS,
            selection=["multimodal_pretrain"],
            instance=instance,
            resources=default_resources(settings),
            raise_on_error=False,
        )
        messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert result.success, "\n".join(messages[-20:])

    metadata = _metadata(result, PRETRAIN)
    assert (metadata["final_step"], metadata["world_size"]) == (4, 2)
    model_dir = Path(metadata["model_dir"])
    assert model_dir == settings.storage.path("models", PRETRAIN)
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()
    assert f"{PRETRAIN}_curves_png" in metadata  # drawn from the history in the StageResult rank 0 sent

    # Rank 0's training log lines reached this run's event log while it ran.
    assert "[pipes] external process successfully opened dagster pipes." in messages
    assert [m for m in messages if m.startswith(f"{PRETRAIN} step 4:") and "loss=" in m]

    # One writer: rank 0 checkpointed a 2-rank run, and every step was recorded once.
    checkpoints = settings.storage.path("checkpoints", PRETRAIN, metadata["fingerprint"])
    latest = load_latest_checkpoint(checkpoints)
    assert latest.step == 4 and latest.config["trainer"]["world_size"] == 2
    steps = [json.loads(line)["step"] for line in (checkpoints / HISTORY_FILE).read_text().splitlines()]
    assert sorted(steps) == [1, 2, 3, 4]
    leftovers = [
        p.name for p in [*checkpoints.iterdir(), *model_dir.parent.iterdir()] if ".tmp-" in p.name or ".old-" in p.name
    ]
    assert leftovers == []
