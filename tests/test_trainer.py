"""Trainer, checkpoints and schedule on a tiny tied-embedding LM (tests/ddp_worker.py)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, load_model

from bitmar_model.checkpoint import (
    config_fingerprint,
    load_checkpoint,
    load_latest_checkpoint,
    restore,
    save_checkpoint,
)
from bitmar_model.deprecation import DeprecatedNameWarning
from bitmar_model.schedules import WarmupCosineSchedule, warmup_cosine_scheduler
from bitmar_model.trainer import (
    ResumableBatchSampler,
    Trainer,
    TrainerConfig,
    TrainingDivergedError,
    parameter_groups,
)
from bitmar_pipeline.config import DeprecatedConfigKeyWarning
from tests.ddp_worker import (
    CountingDataset,
    TinyLM,
    TinyLMConfig,
    lm_loss,
    tiny_config,
    tiny_trainer,
    weights_digest,
)

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "ddp_worker.py"


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread: on a loaded 2-core machine two OpenMP threads make these tiny
    steps ~100x slower, and subprocesses (OMP_NUM_THREADS=1) must compute the same floats."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, torch.Tensor], list[float]]:
    """An uninterrupted 10-step run: final weights and loss history."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    trainer = tiny_trainer(None)
    result = trainer.train()
    torch.set_num_threads(threads)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    return weights, [record["train/loss"] for record in result.history]


def assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), f"{name} differs from the uninterrupted run"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# --- schedule -------------------------------------------------------------------------


def test_schedule_warmup_peak_restarts_and_floor() -> None:
    schedule = WarmupCosineSchedule(warmup_steps=10, max_steps=110, cosine_restarts=1, min_lr_ratio=0.1)
    values = [schedule(step) for step in range(120)]
    assert all(a < b for a, b in zip(values[:10], values[1:11], strict=True))  # warmup rises
    assert values[10] == pytest.approx(1.0) and max(values) == pytest.approx(1.0)
    assert values[60] == pytest.approx(1.0)  # the restart: second 50-step cycle back at peak
    assert all(a > b for a, b in zip(values[10:59], values[11:60], strict=True))  # decays
    assert all(v >= 0.1 - 1e-12 for v in values[10:])  # never below the floor after warmup
    assert values[59] == pytest.approx(0.1, abs=1e-3) and values[110:] == [0.1] * 10

    no_restart = WarmupCosineSchedule(warmup_steps=0, max_steps=100)
    assert no_restart(0) == 1.0 and no_restart(50) == pytest.approx(0.5) and no_restart(100) == 0.0
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosineSchedule(warmup_steps=100, max_steps=100)


def test_scheduler_is_lambdalr_and_state_roundtrips(tmp_path: Path) -> None:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    scheduler = warmup_cosine_scheduler(optimizer, warmup_steps=2, max_steps=10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    torch.save(scheduler.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert state["lr_lambdas"][0] == {"warmup_steps": 2, "max_steps": 10, "cosine_restarts": 0,
                                     "min_lr_ratio": 0.0}
    assert optimizer.param_groups[0]["lr"] == pytest.approx(WarmupCosineSchedule(2, 10)(3))


# --- pieces ---------------------------------------------------------------------------


def test_sampler_order_depends_on_seed_and_epoch_and_resumes_from_any_batch() -> None:
    sampler = ResumableBatchSampler(num_samples=10, batch_size=2, seed=1)
    full = list(sampler)
    sampler.set_position(epoch=0, start_batch=3)
    assert list(sampler) == full[3:] and len(sampler) == 2
    sampler.set_position(epoch=1, start_batch=0)
    assert list(sampler) != full
    # Two ranks: padded to equal length, disjoint apart from the padding, covering everything.
    shards = [list(ResumableBatchSampler(11, 3, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert [len(s) for s in shards] == [2, 2]
    flat = [i for shard in shards for batch in shard for i in batch]
    assert len(flat) == 12 and set(flat) == set(range(11))


def test_no_weight_decay_on_embeddings_norms_and_biases() -> None:
    model = TinyLM(TinyLMConfig())
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [model.hidden.weight.shape]
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.embed.weight) in no_decay_ids  # tied with the head: listed once
    assert len(no_decay["params"]) == 4  # embedding(=head), norm weight+bias, hidden bias


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="precision"):
        TrainerConfig(precision="fp8")
    with pytest.raises(ValueError, match="device"):
        TrainerConfig(device="tpu")
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainerConfig(warmup_steps=10, max_steps=10)
    assert TrainerConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)


def test_config_accepts_the_names_before_the_rename_with_a_warning() -> None:
    with pytest.warns(DeprecatedNameWarning, match=r"TrainerConfig\(\w+=...\) is deprecated; use") as caught:
        config = TrainerConfig(grad_clip=0.5, grad_accumulation_steps=4, keep_last=2)
    assert [str(w.message) for w in caught] == [
        f"TrainerConfig({old}=...) is deprecated; use {new}"
        for old, new in [
            ("grad_clip", "max_grad_norm"),
            ("grad_accumulation_steps", "gradient_accumulation_steps"),
            ("keep_last", "keep_last_checkpoints"),
        ]
    ]
    assert caught[0].filename == __file__  # points at the caller
    assert config == TrainerConfig(max_grad_norm=0.5, gradient_accumulation_steps=4, keep_last_checkpoints=2)
    with pytest.warns(FutureWarning, match="use keep_last_checkpoints"):
        TrainerConfig(keep_last=None)
    with pytest.raises(TypeError, match="grad_clip was renamed to max_grad_norm; pass only max_grad_norm"):
        TrainerConfig(grad_clip=0.5, max_grad_norm=1.0)
    assert DeprecatedConfigKeyWarning is DeprecatedNameWarning  # one class for renamed YAML keys and keywords


# --- training -------------------------------------------------------------------------


def test_loss_decreases_and_same_seed_gives_identical_history(reference) -> None:
    _, losses = reference
    records: list[dict[str, float]] = []
    result = tiny_trainer(None, callbacks=(records.append,)).train()
    assert [r["train/loss"] for r in result.history] == losses
    assert losses[-1] < 0.6 * losses[0]
    assert result.final_step == 10 and len(records) == 10 and result.checkpoint_path is None
    last = records[-1]
    for key in ("train/loss", "train/learning_rate", "train/grad_norm", "train/accuracy",
                "perf/samples_per_second", "perf/tokens_per_second", "perf/eta_seconds"):
        assert math.isfinite(last[key]), key
    assert last["train/skipped_steps"] == 0 and last["perf/eta_seconds"] == 0.0
    other_seed = tiny_trainer(None, seed=124).train()
    assert [r["train/loss"] for r in other_seed.history] != losses


def test_resume_after_crash_matches_uninterrupted_run(tmp_path: Path, reference) -> None:
    weights, losses = reference

    def crash_at_7(record: dict[str, float]) -> None:
        if record["step"] == 7:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_trainer(tmp_path, callbacks=(crash_at_7,)).train()
    assert load_latest_checkpoint(tmp_path).step == 4

    resumed = tiny_trainer(tmp_path)
    result = resumed.train()
    assert result.final_step == 10 and result.checkpoint_path == tmp_path / "step-10"
    assert [r["step"] for r in result.history] == list(range(5, 11))
    assert [r["train/loss"] for r in result.history] == losses[4:]
    assert_same_weights(resumed.model, weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-10", "step-8"]

    # Resuming a finished run trains nothing and keeps the weights.
    again = tiny_trainer(tmp_path)
    assert again.train().final_step == 10
    assert_same_weights(again.model, weights)


@pytest.mark.slow  # subprocesses
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path, reference) -> None:
    weights, _ = reference
    process = subprocess.Popen(
        [sys.executable, str(WORKER), "slow", "--checkpoint-dir", str(tmp_path), "--sleep", "0.4"],
        env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while load_latest_checkpoint(tmp_path) is None:
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    killed_at = load_latest_checkpoint(tmp_path).step
    assert killed_at < 10, "the worker finished before it was killed"

    resumed = tiny_trainer(tmp_path)
    result = resumed.train()
    assert result.history[0]["step"] == killed_at + 1 and result.final_step == 10
    assert_same_weights(resumed.model, weights)


def test_resume_without_rng_restore_would_differ(tmp_path: Path, reference, monkeypatch) -> None:
    """The exact-resume tests have teeth: dropout makes the weights depend on the RNG."""
    weights, _ = reference
    tiny_trainer(tmp_path, max_steps=10).train()
    (tmp_path / "latest.json").write_text(json.dumps({"step": 8, "path": "step-8"}))
    monkeypatch.setattr("bitmar_model.checkpoint.set_rng_state", lambda state, device: None)
    resumed = tiny_trainer(tmp_path)
    resumed.train()
    assert not torch.equal(resumed.model.hidden.weight, weights["hidden.weight"])


def test_nan_steps_are_skipped_and_counted() -> None:
    calls = 0

    def nan_on_some_calls(model, batch):
        nonlocal calls
        calls += 1
        loss, metrics = lm_loss(model, batch)
        return (loss * math.nan if calls in (3, 8) else loss), metrics

    trainer = tiny_trainer(None, gradient_accumulation_steps=1)
    trainer.loss_fn = nan_on_some_calls
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.train()
    assert result.skipped_steps == 2 and result.metrics["train/skipped_steps"] == 2
    assert math.isnan(result.history[2]["train/loss"]) and math.isnan(result.history[7]["train/loss"])
    assert all(math.isfinite(trainer.model.state_dict()[k].sum()) for k in before)
    assert not torch.equal(trainer.model.embed.weight, before["embed.weight"])


def test_divergence_raises_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    calls = 0

    def diverge_after_5(model, batch):
        nonlocal calls
        calls += 1
        loss, metrics = lm_loss(model, batch)
        return (loss + math.inf if calls > 5 else loss), metrics

    trainer = tiny_trainer(tmp_path, gradient_accumulation_steps=1, max_consecutive_nan_steps=3)
    trainer.loss_fn = diverge_after_5
    with pytest.raises(TrainingDivergedError, match="step 8") as raised:
        trainer.train()
    assert raised.value.step == 8 and raised.value.last_checkpoint == tmp_path / "step-4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-4"]
    checkpoint = load_latest_checkpoint(tmp_path, trainer.run_config(1))
    assert checkpoint.step == 4 and checkpoint.extra["counters"]["skipped_steps"] == 0
    weights = load_file(checkpoint.path / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


# --- checkpoints ----------------------------------------------------------------------


def test_checkpoint_from_another_config_is_refused_before_training(tmp_path: Path) -> None:
    tiny_trainer(tmp_path, max_steps=4).train()
    calls = 0

    def counting_loss(model, batch):
        nonlocal calls
        calls += 1
        return lm_loss(model, batch)

    other = tiny_trainer(tmp_path, max_steps=4, learning_rate=1e-3)
    other.loss_fn = counting_loss
    with pytest.raises(ValueError, match="another config") as raised:
        other.train()
    message = str(raised.value)
    assert str(tmp_path / "step-4" / "config.json") in message
    assert "trainer.learning_rate: 0.03 (checkpoint) != 0.001 (current)" in message
    assert calls == 0
    # Runtime-only settings may change on resume.
    assert tiny_trainer(tmp_path, max_steps=4, log_every_n_steps=2, keep_last_checkpoints=5).train().final_step == 4


def test_checkpoint_files_load_without_pickle(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path, max_steps=4)
    trainer.train()
    step_dir = tmp_path / "step-4"
    assert sorted(p.name for p in step_dir.iterdir()) == ["config.json", "model.safetensors",
                                                          "trainer_state.pt"]
    state = torch.load(step_dir / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4 and set(state) == {"step", "optimizer", "scheduler", "rng", "extra"}
    assert state["extra"]["data"] == {"epoch": 0, "batch_index": 8, "sampler_seed": 123}
    assert state["rng"][0]["torch"].dtype == torch.uint8
    if torch.cuda.is_available():
        assert "cuda" not in state["rng"][0]  # trained on CPU
    # The tied embedding/head is stored once and loads back into a fresh model.
    assert set(load_file(step_dir / "model.safetensors")) == {
        "embed.weight", "norm.weight", "norm.bias", "hidden.weight", "hidden.bias"}
    record = json.loads((step_dir / "config.json").read_text())
    assert record["fingerprint"] == config_fingerprint(trainer.run_config(1))
    assert record["config"]["model"] == {"vocab_size": 32, "hidden_size": 16, "dropout": 0.1}
    assert json.loads((tmp_path / "latest.json").read_text()) == {"step": 4, "path": "step-4"}
    assert not list(tmp_path.glob("*.tmp-*"))


def test_partial_and_dangling_checkpoints_are_refused(tmp_path: Path) -> None:
    assert load_latest_checkpoint(tmp_path) is None
    tiny_trainer(tmp_path, max_steps=4).train()
    (tmp_path / "step-4" / "trainer_state.pt").unlink()
    with pytest.raises(ValueError, match=r"partial or corrupt checkpoint .*step-4: missing trainer_state.pt"):
        load_latest_checkpoint(tmp_path)
    (tmp_path / "step-4" / "trainer_state.pt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="corrupt checkpoint state"):
        load_checkpoint(tmp_path / "step-4")
    (tmp_path / "latest.json").write_text(json.dumps({"step": 9, "path": "step-9"}))
    with pytest.raises(ValueError, match=r"points to .*step-9, which does not exist"):
        tiny_trainer(tmp_path, max_steps=4).train()


def test_empty_or_too_small_dataset_and_validate_hooks_refuse_before_training() -> None:
    config = tiny_config(None)
    model = TinyLM(TinyLMConfig())
    with pytest.raises(ValueError, match="empty"):
        Trainer(model, CountingDataset(size=0), lm_loss, config).train()
    with pytest.raises(ValueError, match="fewer than one batch"):
        Trainer(model, CountingDataset(size=3), lm_loss, config).train()

    def refuse(model, dataset):
        raise ValueError(f"refused {len(dataset)} samples")

    with pytest.raises(ValueError, match="refused 40 samples"):
        Trainer(model, CountingDataset(), lm_loss, config, validate_fns=[refuse]).train()


def test_eval_fn_runs_without_touching_the_training_rng(reference) -> None:
    weights, _ = reference

    def eval_fn(model):
        assert not model.training and not torch.is_grad_enabled()
        torch.rand(100)  # consumes RNG: must not shift the training stream
        return {"loss": lm_loss(model, CountingDataset().sequences[:8])[0].item()}

    trainer = tiny_trainer(None, eval_every_n_steps=5)
    trainer.eval_fn = eval_fn
    result = trainer.train()
    assert [r["step"] for r in result.eval_history] == [5, 10]
    assert math.isfinite(result.eval_history[-1]["eval/loss"])
    assert_same_weights(trainer.model, weights)


# --- DDP ------------------------------------------------------------------------------


@pytest.mark.slow  # subprocesses
def test_ddp_two_processes_gloo(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), str(WORKER), "ddp",
        "--checkpoint-root", str(tmp_path / "ckpt"), "--out", str(out),
    ]
    done = subprocess.run(command, env=worker_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert reports[0]["digest"] == reports[1]["digest"]
    assert math.isfinite(reports[0]["loss"]) and reports[0]["loss"] == reports[1]["loss"]
    assert reports[0]["checkpoint_path"] == str(tmp_path / "ckpt" / "rank-0" / "step-10")
    assert reports[1]["checkpoint_path"] is None and not (tmp_path / "ckpt" / "rank-1").exists()

    checkpoint = load_latest_checkpoint(tmp_path / "ckpt" / "rank-0")
    assert checkpoint.step == 10 and checkpoint.config["trainer"]["world_size"] == 2
    assert len(checkpoint.trainer_state["rng"]) == 2  # one RNG state per rank
    model = TinyLM(TinyLMConfig())
    load_model(model, checkpoint.path / "model.safetensors")
    assert weights_digest(model) == reports[0]["digest"]


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path, max_steps=4)
    trainer.train()
    checkpoint = load_latest_checkpoint(tmp_path)
    other = TinyLM(TinyLMConfig(hidden_size=8))
    optimizer = torch.optim.AdamW(other.parameters())
    scheduler = warmup_cosine_scheduler(optimizer, 0, 4)
    with pytest.raises(ValueError, match=r"model.safetensors do not fit the model"):
        restore(checkpoint, other, optimizer, scheduler, device="cpu")


class _VariableLengths(torch.utils.data.Dataset):
    """Two sequences of very different lengths: 3 and 11 next-token targets."""

    def __init__(self) -> None:
        self.sequences = [torch.arange(4) % 32, (torch.arange(12) * 5) % 32]

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.sequences[index]


def _pad(sequences: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=-1)


def _padded_lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    logits = model(batch[:, :-1].clamp_min(0))
    targets = batch[:, 1:]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1), {}


def _target_count(batch: torch.Tensor) -> int:
    return int((batch[:, 1:] != -1).sum())


def test_accumulated_gradient_is_the_token_mean_of_the_whole_step(monkeypatch) -> None:
    """Two micro-batches of 3 and 11 target tokens accumulate to the gradient of one batch
    holding both, not to the mean of the two micro-batch means."""
    torch.manual_seed(0)
    model = TinyLM(TinyLMConfig(dropout=0.0))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    seen: dict[str, torch.Tensor] = {}
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        seen.update({n: p.grad.clone() for n, p in model.named_parameters()})
        return clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    config = tiny_config(
        None, max_steps=1, warmup_steps=0, batch_size=1, gradient_accumulation_steps=2, max_grad_norm=0.0
    )
    Trainer(model, _VariableLengths(), _padded_lm_loss, config, collate_fn=_pad, token_count_fn=_target_count).train()

    reference = TinyLM(TinyLMConfig(dropout=0.0))
    reference.load_state_dict(initial)
    whole, _ = _padded_lm_loss(reference, _pad(_VariableLengths().sequences))
    whole.backward()
    for name, parameter in reference.named_parameters():
        assert torch.allclose(seen[name], parameter.grad, atol=1e-6), name
    # The test can tell the two apart: the mean of per-micro-batch means is another gradient.
    reference.zero_grad()
    means = sum(_padded_lm_loss(reference, _pad([s]))[0] for s in _VariableLengths().sequences) / 2
    means.backward()
    assert not torch.allclose(reference.embed.weight.grad, seen["embed.weight"], atol=1e-4)


def _linear_state() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def test_checkpoint_written_on_cuda_restores_the_cuda_rng(tmp_path: Path, monkeypatch) -> None:
    """GRPO's path (no rng_states of its own): the device named at save time decides which
    generator states are stored, so a resume on that device finds its CUDA state."""
    cuda_state = torch.arange(16, dtype=torch.uint8)
    restored: list[torch.Tensor] = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: cuda_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: restored.append(state))
    gpu = torch.device("cuda", 0)
    model, optimizer, scheduler = _linear_state()
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {}, {"run": 1}, device=gpu)
    restore(load_latest_checkpoint(tmp_path), model, optimizer, scheduler, device=gpu)
    assert len(restored) == 1 and torch.equal(restored[0], cuda_state)
    # States gathered elsewhere must match the device too: a CPU-only state is refused at save.
    with pytest.raises(ValueError, match="no CUDA RNG state"):
        save_checkpoint(
            tmp_path,
            2,
            model,
            optimizer,
            scheduler,
            {},
            {"run": 1},
            device=gpu,
            rng_states=[{"torch": torch.get_rng_state()}],
        )
