"""The training and evaluation stages through the Dagster API, on a tiny model and tiny data:
the whole graph, re-running one stage alone, kill -9 and resume, and refusals of bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from assets.definitions import ALL_ASSETS, default_resources
from bitmar_pipeline.cli import main
from bitmar_pipeline.resources.settings import BitmarSettings
from bitmar_pipeline.training.datasets import TrainingDataError
from tests.factories import TINY

# Runs subprocesses or whole Dagster runs: deselect with -m 'not slow'; .ci/run runs it.
pytestmark = pytest.mark.slow

DATA = "coco_raw,image_caption_pairs,vision_features,robot_selection_tasks,text_tokenizer"


def _cli_args(overrides: dict) -> list[str]:
    return [
        arg
        for key, value in overrides.items()
        for arg in ("--set", f"{key}={json.dumps(value) if isinstance(value, bool) else value}")
    ]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Data stages materialized once for the module (storage under <workdir>/.bitmar)."""
    path = tmp_path_factory.mktemp("training")
    cwd = os.getcwd()
    os.chdir(path)
    try:
        assert main(["run", "--select", DATA, *_cli_args(TINY)]) == 0
    finally:
        os.chdir(cwd)
    return path


def _materialize(selection, overrides=None, instance=None):
    settings = BitmarSettings(overrides={**TINY, **(overrides or {})})
    return dg.materialize(
        ALL_ASSETS, selection=selection, resources=default_resources(settings), instance=instance, raise_on_error=False
    )


def _metadata(result, key):
    events = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(key)]
    return {k: v.value for k, v in events[0].step_materialization_data.materialization.metadata.items()}


def test_training_graph_then_rerun_one_stage(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    with dg.instance_for_test() as instance:
        full = _materialize(
            ["multimodal_pretrain", "reasoning_sft", "grpo_policy", "evaluation_report"], instance=instance
        )
        assert full.success
        pretrain = _metadata(full, "multimodal_pretrain")
        assert pretrain["final_step"] == 6 and pretrain["resumed_from_step"] == "fresh start"
        assert {"i2t_R@1", "cosine_gap", "multimodal_pretrain_curves_figure"} <= set(pretrain)
        grpo = _metadata(full, "grpo_policy")
        assert {
            "table_sft_vs_grpo",
            "grpo_policy_curves_figure",
            "grpo_test_reasoning_well_formed",
            "sft_test_head_top1",
        } <= set(grpo)
        report = json.loads((workdir / ".bitmar" / "reports" / "evaluation_report.json").read_text())
        for model in ("majority", "tfidf_logreg", "bitmar_head", "bitmar_reasoning_text"):
            assert {"value", "ci95_low", "ci95_high", "n"} <= set(
                next(iter(report["robot_selection"]["test"][model].values()))
            )
        assert set(report["reasoning"]["test"]) >= {
            "coherence",
            "relevance",
            "completeness",
            "accuracy",
            "format_compliance",
            "stated_confidence_ece",
        }
        assert {"bleu4", "cider_d", "caption_perplexity", "i2t_R@5"} <= set(report["vision_language"])
        assert report["flops_per_forward"]["text_only_task_batch"]["total"] > 0
        assert {e.check_name for e in full.get_asset_check_evaluations()} >= {
            "test_head_top1",
            "test_head_top1_gain_over_majority",
            "test_head_f1_vs_tfidf",
            "reasoning_format_compliance",
        }

        # GRPO again with another reward weight: it retrains from the stored SFT model alone.
        rerun = _materialize(["grpo_policy"], {"grpo_reasoning.reward_weights.format": 1.0}, instance=instance)
        assert rerun.success
        assert [e.asset_key.to_user_string() for e in rerun.get_asset_materialization_events()] == ["grpo_policy"]
        assert _metadata(rerun, "grpo_policy")["fingerprint"] != grpo["fingerprint"]
        assert _metadata(rerun, "grpo_policy")["resumed_from_step"] == "fresh start"


def test_cli_run_shows_training_progress_in_few_lines(workdir, monkeypatch, capsys):
    """The whole graph through `bitmar run` with stderr not a TTY (as in CI): one summary line per
    materialization and four progress lines per training stage, 40 lines in all at most."""
    monkeypatch.chdir(workdir)
    steps = {"training.pretrain.max_steps": 8, "grpo_reasoning.steps": 4}  # new fingerprints: every stage trains
    assert main(["run", *_cli_args({**TINY, **steps})]) in (0, 1)  # 1: an error-severity check failed
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    progress = [line for line in captured.err.splitlines() if " step " in line and "ETA " in line]
    assert [line.split(" [")[0].split(",")[0] for line in progress] == [
        "multimodal_pretrain: step 2/8 (25%)",
        "multimodal_pretrain: step 4/8 (50%)",
        "multimodal_pretrain: step 6/8 (75%)",
        "multimodal_pretrain: step 8/8 (100%)",
        "reasoning_sft: step 2/6 (33%)",
        "reasoning_sft: step 4/6 (67%)",
        "reasoning_sft: step 6/6 (100%)",
        "grpo_policy: step 1/4 (25%)",
        "grpo_policy: step 2/4 (50%)",
        "grpo_policy: step 3/4 (75%)",
        "grpo_policy: step 4/4 (100%)",
    ]


def test_killed_training_resumes_from_last_checkpoint(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    slow = {"training.pretrain.max_steps": 400, "training.save_every_n_steps": 5, "training.pretrain.batch_size": 16}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bitmar_pipeline.cli",
            "run",
            "--select",
            "multimodal_pretrain",
            *_cli_args({**TINY, **slow}),
        ],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = workdir / ".bitmar" / "checkpoints" / "multimodal_pretrain"
    earlier_runs = set(checkpoints.glob("*"))

    def new_checkpoints() -> list[Path]:
        return [p for p in checkpoints.glob("*/latest.json") if p.parent not in earlier_runs]

    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None and not new_checkpoints():
            time.sleep(0.05)
        time.sleep(0.5)
        assert process.poll() is None, "training finished before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    saved = max(int(json.loads(p.read_text())["step"]) for p in new_checkpoints())
    assert 0 < saved < 400

    result = _materialize(["multimodal_pretrain"], slow)
    assert result.success
    metadata = _metadata(result, "multimodal_pretrain")
    assert metadata["resumed_from_step"] >= saved
    assert metadata["final_step"] == 400


def test_bad_inputs_are_refused_before_training(workdir, monkeypatch):
    from bitmar_pipeline.config import load_config
    from bitmar_pipeline.storage import Storage
    from bitmar_pipeline.training.datasets import (
        build_sft_set,
        check_compatible,
        load_pipeline_tokenizer,
    )
    from bitmar_pipeline.training.stages import load_stage_model, run_reasoning_sft

    monkeypatch.chdir(workdir)
    storage = Storage(load_config(None, TINY).storage.root)
    tokenizer = load_pipeline_tokenizer(storage)
    if not (storage.path("models", "multimodal_pretrain") / "config.json").is_file():
        assert _materialize(["multimodal_pretrain"]).success
    model = load_stage_model(storage, "multimodal_pretrain")
    with pytest.raises(TrainingDataError, match="vocabulary mismatch"):
        model.config.vocab_size += 1
        check_compatible(model.config, tokenizer)
    model.config.vocab_size -= 1
    with pytest.raises(TrainingDataError, match="width 768"):
        check_compatible(model.config, tokenizer, feature_dim=768, num_patches=16)
    with pytest.raises(TrainingDataError, match="empty"):
        build_sft_set([], tokenizer, 16, 16)
    from bitmar_pipeline.training.reasoning_targets import SftExample

    one_class = [SftExample(str(i), "Task: x", "t", ["Drone"], "task") for i in range(4)]
    with pytest.raises(TrainingDataError, match="single label set"):
        build_sft_set(one_class, tokenizer, 16, 16)
    # An SFT run on robot tables without a train split stops with a clear message, before any step.
    other = Storage(workdir / "no-train-split")
    tasks = storage.read_partition("robot_tasks", "all").assign(split="validation")
    other.write_partition("robot_tasks", "all", tasks)
    other.write_partition("robot_subtasks", "all", storage.read_partition("robot_subtasks", "all"))
    shutil.copytree(storage.path("tokenizer"), other.path("tokenizer"))
    with pytest.raises(TrainingDataError, match="no train split"):
        run_reasoning_sft(load_config(None, {**TINY, "storage.root": str(other.root)}), other, [], "unused")


def test_sft_batches_rehearse_captions_of_training_images_only(workdir, monkeypatch):
    import torch

    from bitmar_model.losses import sft_loss
    from bitmar_pipeline.data.coco import manifest_shards
    from bitmar_pipeline.resources.settings import VisionEncoderResource
    from bitmar_pipeline.training.datasets import (
        RehearsalSftSet,
        build_sft_set,
        load_caption_data,
        load_pipeline_tokenizer,
    )
    from bitmar_pipeline.training.reasoning_targets import build_sft_examples
    from bitmar_pipeline.training.stages import _robot_tables, load_stage_model

    monkeypatch.chdir(workdir)
    settings = BitmarSettings(overrides=TINY)
    storage, training = settings.storage, settings.config.training
    if not (storage.path("models", "multimodal_pretrain") / "config.json").is_file():
        assert _materialize(["multimodal_pretrain"]).success
    tokenizer = load_pipeline_tokenizer(storage)
    tasks, subtasks, capabilities = _robot_tables(storage)
    sft = build_sft_set(build_sft_examples(tasks, subtasks, capabilities), tokenizer, 64, 256)
    fingerprint = VisionEncoderResource().get(settings).fingerprint
    captions = load_caption_data(
        storage, manifest_shards(storage), fingerprint, tokenizer, 64, training.heldout_fraction
    )
    dataset = RehearsalSftSet(sft, captions.train, captions_per_batch=3)

    batch = dataset.collate([0, 1])
    assert batch["rehearsal_decoder_ids"].shape[0] == 3 and batch["prompt_ids"].shape[0] == 2
    assert torch.equal(
        dataset.collate([0, 1])["rehearsal_decoder_ids"], batch["rehearsal_decoder_ids"]
    )  # replayable on resume
    drawn = {tuple(dataset.collate([i, i + 1])["rehearsal_cls"][0].tolist()) for i in range(10)}
    assert len(drawn) > 1
    heldout = {tuple(row.tolist()) for row in captions.heldout.cls[captions.heldout.feature_rows]}
    assert not drawn & heldout

    model = load_stage_model(storage, "multimodal_pretrain").eval()
    with torch.no_grad():
        plain, plain_metrics = sft_loss(model, batch, selection_weight=1.0)
        rehearsed, metrics = sft_loss(model, batch, selection_weight=1.0, rehearsal_weight=0.5)
    assert "caption_rehearsal_loss" not in plain_metrics
    assert rehearsed.item() == pytest.approx(plain.item() + 0.5 * metrics["caption_rehearsal_loss"], rel=1e-5)
