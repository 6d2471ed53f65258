"""`bitmar run`'s training progress (bitmar_pipeline/training/progress.py) on a fake step loop:
four lines with step/total and ETA when stderr is not a TTY, a tqdm bar redrawn in place when it is."""

import io
import types

from bitmar_pipeline.config import load_config
from bitmar_pipeline.resources.settings import BitmarSettings
from bitmar_pipeline.training import progress as progress_module
from bitmar_pipeline.training.launch import _parser, build_torchrun_command
from bitmar_pipeline.training.progress import TrainingProgress, stage_steps
from bitmar_pipeline.training.stages import GRPO, PRETRAIN, SFT


def _fake_loop(callback, total: int, log_every: int, grpo: bool = False) -> None:
    """What the Trainer (every log_every steps and at the last) or GRPO (every step) calls back with."""
    for step in range(1, total + 1):
        if step % log_every == 0 or step == total:
            loss = 5.0 / step
            callback({"step": step, "train/grpo_reasoning_loss": loss, "reward/total": 0.5} if grpo else
                     {"step": step, "train/loss": loss, "train/learning_rate": 1e-3})


def test_without_a_tty_four_lines_with_step_total_and_eta():
    out = io.StringIO()
    with TrainingProgress(PRETRAIN, 200, file=out, tty=False) as progress:
        _fake_loop(progress, 200, log_every=20)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split(" [")[0] for line in lines] == [
        f"{PRETRAIN}: step 60/200 (30%), loss=0.08333",
        f"{PRETRAIN}: step 100/200 (50%), loss=0.05",
        f"{PRETRAIN}: step 160/200 (80%), loss=0.03125",
        f"{PRETRAIN}: step 200/200 (100%), loss=0.025",
    ]
    assert all("elapsed 00:00" in line and "ETA " in line for line in lines), lines
    assert lines[-1].endswith("ETA 00:00]")


def test_without_a_tty_a_coarse_log_interval_prints_one_line_per_record():
    out = io.StringIO()
    progress = TrainingProgress(SFT, 200, file=out, tty=False)
    _fake_loop(progress, 200, log_every=120)  # step 120 crosses 25% and 50%
    progress.close()
    assert [line.split(",")[0] for line in out.getvalue().splitlines()] == [
        f"{SFT}: step 120/200 (60%)",
        f"{SFT}: step 200/200 (100%)",
    ]


def test_grpo_records_show_loss_and_reward():
    out = io.StringIO()
    with TrainingProgress(GRPO, 4, file=out, tty=False) as progress:
        _fake_loop(progress, 4, log_every=1, grpo=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[-1].startswith(f"{GRPO}: step 4/4 (100%), loss=1.25, reward=0.5 [elapsed ")


def test_on_a_tty_one_bar_redrawn_in_place():
    out = io.StringIO()
    with TrainingProgress(PRETRAIN, 200, file=out, tty=True, mininterval=0) as progress:  # draw at every record
        assert progress.bar is None  # nothing is drawn before the first record (a stage reused from storage)
        _fake_loop(progress, 200, log_every=20)
    text = out.getvalue()
    assert text.count("\r") >= 10  # every redraw returns to the start of the same line
    assert text.count("\n") == 1  # the finished bar stays, as one line
    final = text.rstrip("\n").split("\r")[-1]
    assert "200/200" in final and "100%" in final and final.endswith("[00:00, ETA 00:00, loss=0.025]")


def test_stage_totals_and_the_torchrun_flag(tmp_path):
    steps = {"training.pretrain.max_steps": 70, "training.sft.max_steps": 50, "grpo_reasoning.steps": 3}
    config = load_config(None, steps)
    assert [stage_steps(config, s) for s in (PRETRAIN, SFT, GRPO)] == [70, 50, 3]
    settings = BitmarSettings(overrides={"storage.root": str(tmp_path)})
    assert "--progress" not in build_torchrun_command(PRETRAIN, settings, 2)
    command = build_torchrun_command(PRETRAIN, settings, 2, progress=True)
    assert _parser().parse_args(command[command.index("--stage"):]).progress


def test_eta_leaves_out_the_setup_before_the_first_step(monkeypatch):
    """100 s of loading before step 1: the ETA comes from the time per step, not elapsed/step."""
    now = [0.0]
    monkeypatch.setattr(progress_module, "time", types.SimpleNamespace(time=lambda: now[0]))
    out = io.StringIO()
    progress = TrainingProgress(PRETRAIN, 100, file=out, tty=False)
    now[0] = 100.0
    progress({"step": 25, "train/loss": 2.0, "perf/step_seconds": 2.0})  # the Trainer's window mean, at first
    now[0] = 125.0
    progress({"step": 50, "train/loss": 1.0, "perf/step_seconds": 9.0})  # then 1 s/step since the last record
    assert out.getvalue().splitlines() == [
        f"{PRETRAIN}: step 25/100 (25%), loss=2 [elapsed 01:40, ETA 02:30]",
        f"{PRETRAIN}: step 50/100 (50%), loss=1 [elapsed 02:05, ETA 00:50]",
    ]
