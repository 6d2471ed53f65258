"""A generic, model-agnostic training loop (single process or torchrun DDP).

The model-specific part is `loss_fn(model, batch) -> (loss, metrics)`; everything else
lives here: AdamW with decay-free norms/biases/embeddings, warmup + cosine schedule,
gradient accumulation and clipping, mixed precision, optional torch.compile, skipping of
non-finite steps, atomic resumable checkpoints and throughput logging through callbacks.

Resuming is exact: the data order depends only on (seed, epoch) and the resumed run skips
the batches the interrupted one had consumed without loading them, and the optimizer,
schedule and RNG states come back from the checkpoint, so a killed-and-resumed run ends
with the same weights as an uninterrupted one (bit for bit on CPU in fp32).

    trainer = Trainer(model, dataset, loss_fn, TrainerConfig(max_steps=1000, checkpoint_dir="ckpt"))
    result = trainer.train()          # resumes from ckpt/latest.json when present

Under torchrun (WORLD_SIZE > 1) the same call initialises the process group, wraps the
model in DistributedDataParallel, shards every batch by rank and lets rank 0 alone log and
write checkpoints. `loss_fn` must call `model(...)` (the DDP wrapper's forward) for the
gradients to be synchronised, and return the same metric keys on every rank.

Gradient accumulation: with `token_count_fn(batch)` (the number of tokens `loss_fn`'s loss is
a mean over), each micro-batch's loss is weighted by its share of the tokens of the whole
step, summed over micro-batches and ranks, so the step's gradient is the token mean of
everything it saw, as one big batch would give; without it, micro-batches weigh equally.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from bitmar_model.checkpoint import capture_rng_state, unwrap_model
from bitmar_model.deprecation import accepts_renamed_keywords
from bitmar_model.loop import LoopSettings, StepLoop, TrainingDivergedError
from bitmar_model.schedules import warmup_cosine_scheduler

__all__ = ["Trainer", "TrainerConfig", "TrainResult", "TrainingDivergedError", "parameter_groups"]

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, Mapping[str, float]]]
TokenCountFn = Callable[[Any], float]
EvalFn = Callable[[nn.Module], Mapping[str, float]]
ValidateFn = Callable[[nn.Module, Dataset], None]
Callback = Callable[[dict[str, float]], None]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# A metric under this key counts tokens; it is summed (for tokens/s), not averaged.
TOKENS_METRIC = "tokens"

# TrainerConfig's keywords before the issue 11 rename, accepted with a warning for one release.
RENAMED_KEYWORDS = {
    "grad_clip": "max_grad_norm",
    "grad_accumulation_steps": "gradient_accumulation_steps",
    "keep_last": "keep_last_checkpoints",
}


@accepts_renamed_keywords(RENAMED_KEYWORDS)
@dataclass
class TrainerConfig:
    """Optimisation and run settings. Fields in `RUNTIME_FIELDS` may change between a run and
    its resume; all others are part of the checkpoint fingerprint."""

    learning_rate: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    max_steps: int = 1000
    cosine_restarts: int = 0
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0  # gradients are clipped to this global norm; 0 disables clipping
    gradient_accumulation_steps: int = 1
    batch_size: int = 8  # per rank and micro-step
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N" (under DDP: cuda:LOCAL_RANK)
    # "auto": bf16 autocast on CUDA when supported, else fp16 with a GradScaler; fp32 on CPU.
    precision: str = "auto"
    compile: bool = False
    save_every_n_steps: int = 500  # 0: only at the end
    keep_last_checkpoints: int | None = 3  # None keeps every checkpoint
    log_every_n_steps: int = 10
    eval_every_n_steps: int = 0  # 0: eval_fn runs only at the end
    max_consecutive_nan_steps: int = 5
    checkpoint_dir: str | None = None  # None: no checkpoints, no resume
    num_workers: int = 0

    RUNTIME_FIELDS = frozenset(
        {
            "device",
            "precision",
            "compile",
            "save_every_n_steps",
            "keep_last_checkpoints",
            "log_every_n_steps",
            "eval_every_n_steps",
            "max_consecutive_nan_steps",
            "checkpoint_dir",
            "num_workers",
        }
    )

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))  # YAML gives a list
        positive = ("learning_rate", "max_steps", "gradient_accumulation_steps", "batch_size",
                    "log_every_n_steps", "max_consecutive_nan_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainerConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "max_grad_norm", "save_every_n_steps", "eval_every_n_steps",
                     "num_workers", "warmup_steps", "cosine_restarts"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainerConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"TrainerConfig.warmup_steps ({self.warmup_steps}) must be < max_steps ({self.max_steps})"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainerConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.keep_last_checkpoints is not None and self.keep_last_checkpoints < 1:
            raise ValueError(
                f"TrainerConfig.keep_last_checkpoints must be >= 1 or None, got {self.keep_last_checkpoints}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainerConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not _DEVICE.match(self.device):
            raise ValueError(f"TrainerConfig.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "betas": list(self.betas)}

    def fingerprint_dict(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        return {
            _FINGERPRINT_NAMES.get(k, k): v for k, v in self.to_dict().items() if k not in self.RUNTIME_FIELDS
        }

    def loop_settings(self) -> LoopSettings:
        return LoopSettings(
            self.max_steps, self.checkpoint_dir, self.save_every_n_steps, self.keep_last_checkpoints,
            self.max_consecutive_nan_steps,
        )


# Checkpoints keep the names their fingerprints were computed with before the issue 11 rename,
# so runs started before it still resume.
_FINGERPRINT_NAMES = {"max_grad_norm": "grad_clip", "gradient_accumulation_steps": "grad_accumulation_steps"}


@dataclass
class TrainResult:
    final_step: int
    metrics: dict[str, float]  # the last log record
    history: list[dict[str, float]]  # one record per log step of this run
    eval_history: list[dict[str, float]]  # rank 0 only (eval_fn runs there)
    checkpoint_path: Path | None  # the final checkpoint (None on non-main ranks)
    skipped_steps: int  # non-finite steps over the whole run, resumes included
    resumed_from_step: int | None = None  # the checkpoint step this run continued from


@dataclass
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def distributed_context(device: str = "auto") -> DistributedContext:
    """Rank, world size, local rank (from torchrun's environment) and the device to train on."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if world_size > 1:
            resolved = torch.device("cuda", local_rank)  # torchrun: one GPU per local rank
        elif resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
    return DistributedContext(rank, world_size, local_rank, resolved)


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices in an order that depends only on (seed, epoch), sharded
    across ranks like DistributedSampler (padded so every rank gets as many batches), and
    started at any batch of the epoch: resuming skips consumed batches without loading them.
    Incomplete last batches are dropped so every step sees the same number of samples."""

    def __init__(
        self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.world_size) // self.batch_size

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        total = math.ceil(self.num_samples / self.world_size) * self.world_size
        order = (order * math.ceil(total / self.num_samples))[:total]  # pad by wrapping around
        shard = order[self.rank : total : self.world_size]
        for batch in range(self.start_batch, self.batches_per_epoch):
            yield shard[batch * self.batch_size : (batch + 1) * self.batch_size]

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.start_batch, 0)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices; never decay biases, norm gains (ndim < 2) or embeddings
    (decay would pull rare tokens' rows to zero). Tied parameters appear once."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for parameter in model.parameters():
        if parameter.requires_grad:
            exempt = parameter.ndim < 2 or id(parameter) in embeddings
            (no_decay if exempt else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


@dataclass
class _DataPosition:
    """Which batch of which epoch this rank reads next; saved in every checkpoint (extra["data"])."""

    epoch: int = 0
    batch_index: int = 0  # batches of `epoch` this rank has consumed

    def to_extra(self, seed: int) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "sampler_seed": seed}


@dataclass
class _Window:
    """What happened since the last log record."""

    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    metric_sums: dict[str, float] = field(default_factory=dict)
    metric_counts: dict[str, int] = field(default_factory=dict)

    def add_metrics(self, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.metric_sums[key] = self.metric_sums.get(key, 0.0) + float(value)
            self.metric_counts[key] = self.metric_counts.get(key, 0) + 1


@dataclass
class _Run:
    """Everything one `train()` call builds before its first step, and what it collects."""

    ctx: DistributedContext
    precision: str
    model: nn.Module  # the plain module: checkpoints, clipping and evaluation use it
    train_model: nn.Module  # what loss_fn calls: compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    sampler: ResumableBatchSampler
    loop: StepLoop
    position: _DataPosition
    history: list[dict[str, float]] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset,
        loss_fn: LossFn,
        config: TrainerConfig,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        eval_fn: EvalFn | None = None,
        callbacks: Sequence[Callback] = (),
        *,
        validate_fns: Sequence[ValidateFn] = (),
        model_config: Mapping[str, Any] | None = None,
        token_count_fn: TokenCountFn | None = None,
    ) -> None:
        """`eval_fn(model) -> metrics` runs on rank 0 in eval mode without gradients (logged as
        `eval/<name>`); `validate_fns(model, dataset)` run before the first step and raise to
        refuse the run; `model_config` (default: `model.config.to_dict()` when the model has
        one) goes into the checkpoint fingerprint; `token_count_fn(batch)` weights accumulated
        micro-batches by their tokens (module docstring)."""
        self.model = model
        self.train_dataset = train_dataset
        self.loss_fn = loss_fn
        self.config = config
        self.collate_fn = collate_fn
        self.eval_fn = eval_fn
        self.callbacks = list(callbacks)
        self.validate_fns = list(validate_fns)
        self.token_count_fn = token_count_fn
        self.model_config = dict(model_config) if model_config is not None else _model_config(model)

    def run_config(self, world_size: int) -> dict[str, Any]:
        """The config a checkpoint is fingerprinted with (world size changes the batch and the
        data shards, so it is part of it)."""
        return {
            "model": self.model_config,
            "trainer": {**self.config.fingerprint_dict(), "world_size": world_size},
        }

    def train(self, resume: bool = True) -> TrainResult:
        """Train to `max_steps`, continuing from the latest checkpoint when `resume`."""
        ctx = distributed_context(self.config.device)
        owns_process_group = ctx.is_distributed and not dist.is_initialized()
        if owns_process_group:
            if ctx.device.type == "cuda":
                torch.cuda.set_device(ctx.device)
            dist.init_process_group(backend="nccl" if ctx.device.type == "cuda" else "gloo")
        try:
            return self._train(ctx, resume)
        finally:
            if owns_process_group:
                dist.destroy_process_group()

    def _validate(self, ctx: DistributedContext, sampler: ResumableBatchSampler) -> None:
        if sampler.num_samples == 0:
            raise ValueError("train_dataset is empty: nothing to train on")
        if sampler.batches_per_epoch == 0:
            raise ValueError(
                f"train_dataset has {sampler.num_samples} samples, fewer than one batch of "
                f"{self.config.batch_size} per rank on {ctx.world_size} rank(s)"
            )
        for validate in self.validate_fns:
            validate(self.model, self.train_dataset)

    def _train(self, ctx: DistributedContext, resume: bool) -> TrainResult:
        run = self._prepare(ctx, resume)
        data = self._batches(run)
        window = _Window()
        while not run.loop.done:
            window = self._train_step(run, data, window)
        return TrainResult(
            final_step=run.loop.step,
            metrics=run.history[-1] if run.history else {},
            history=run.history,
            eval_history=run.eval_history,
            checkpoint_path=run.loop.last_checkpoint,
            skipped_steps=run.loop.counters.skipped_steps,
            resumed_from_step=run.loop.resumed_from,
        )

    def _prepare(self, ctx: DistributedContext, resume: bool) -> _Run:
        """Validate, build model, optimizer, schedule and scaler, resume, then wrap the model."""
        cfg = self.config
        if not hasattr(self.train_dataset, "__len__"):
            raise ValueError("train_dataset must be a map-style dataset (with __len__)")
        sampler = ResumableBatchSampler(
            len(self.train_dataset), cfg.batch_size, cfg.seed, ctx.rank, ctx.world_size
        )
        self._validate(ctx, sampler)
        precision = _resolve_precision(cfg.precision, ctx.device)

        # Per-rank seed: ranks draw different dropout masks; DDP keeps the weights in sync.
        torch.manual_seed(cfg.seed + ctx.rank)
        model = self.model.to(ctx.device)
        model.train()
        optimizer = torch.optim.AdamW(
            parameter_groups(model, cfg.weight_decay), lr=cfg.learning_rate, betas=cfg.betas
        )
        scheduler = warmup_cosine_scheduler(
            optimizer, cfg.warmup_steps, cfg.max_steps, cfg.cosine_restarts, cfg.min_lr_ratio
        )
        scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        loop = StepLoop(
            cfg.loop_settings(), self.run_config(ctx.world_size), ctx.device, rank=ctx.rank, is_main=ctx.is_main
        )
        position = _DataPosition()
        # Before the DDP wrap: DDP broadcasts rank 0's weights when it is constructed.
        extra = loop.resume(model, optimizer, scheduler) if resume else None
        if extra is not None:
            position = _DataPosition(extra["data"]["epoch"], extra["data"]["batch_index"])
            if scaler is not None and extra["grad_scaler"]:
                scaler.load_state_dict(extra["grad_scaler"])
        return _Run(
            ctx, precision, model, self._wrap(model, ctx), optimizer, scheduler, scaler, sampler, loop, position
        )

    def _wrap(self, model: nn.Module, ctx: DistributedContext) -> nn.Module:
        train_model: nn.Module = torch.compile(model) if self.config.compile else model
        if ctx.is_distributed:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            # static_graph: a loss may run the model more than once per step (BitMar's
            # pretraining does) and leave some parameters unused; the used set is the same
            # every step, which is what static_graph lets DDP rely on.
            train_model = DistributedDataParallel(train_model, device_ids=device_ids, static_graph=True)
        return train_model

    def _batches(self, run: _Run) -> Iterator[Any]:
        """Endless batches from the run's data position, which they advance."""
        cfg, position = self.config, run.position
        # A dedicated generator: DataLoader draws its workers' base seed from it on every new
        # iterator, which would otherwise consume the global RNG at epoch boundaries.
        loader_generator = torch.Generator()
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=run.sampler,
            collate_fn=self.collate_fn,
            num_workers=cfg.num_workers,
            pin_memory=run.ctx.device.type == "cuda",
            generator=loader_generator,
        )
        while True:
            run.sampler.set_position(position.epoch, position.batch_index)
            loader_generator.manual_seed(_mix_seed(cfg.seed, position.epoch))
            for batch in loader:
                position.batch_index += 1
                yield batch
            position.epoch, position.batch_index = position.epoch + 1, 0

    def _train_step(self, run: _Run, data: Iterator[Any], window: _Window) -> _Window:
        """One optimizer step (skipped when non-finite), then logging, evaluation and checkpoint."""
        started = time.perf_counter()
        loss_value = self._forward_backward(run, data, window)
        finite, grad_norm = self._unscale_and_clip(run, loss_value)
        learning_rate = run.optimizer.param_groups[0]["lr"]
        if finite:
            if run.scaler is not None:
                run.scaler.step(run.optimizer)
                run.scaler.update()
            else:
                run.optimizer.step()
            window.losses.append(loss_value)
            window.grad_norms.append(grad_norm)
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        window.steps += 1
        window.seconds += time.perf_counter() - started
        step = run.loop.finish_step(finite)
        return self._after_step(run, window, step, learning_rate)

    def _forward_backward(self, run: _Run, data: Iterator[Any], window: _Window) -> float:
        """Accumulate the gradients of one step's micro-batches; return the step's loss (all ranks)."""
        ctx = run.ctx
        loss_sum = torch.zeros((), device=ctx.device)
        micro_batches = [_to_device(next(data), ctx.device) for _ in range(self.config.gradient_accumulation_steps)]
        for batch, weight in zip(micro_batches, self._micro_batch_weights(micro_batches, ctx), strict=True):
            # Gradients are all-reduced on every micro-step: DDP's no_sync() trips an
            # internal reducer assert under static_graph (torch 2.13), and static_graph is
            # what lets a loss run the model twice per step. Costs one extra all-reduce
            # per accumulated micro-step.
            with _autocast(ctx.device, run.precision):
                loss, metrics = self.loss_fn(run.train_model, batch)
            scaled = loss * weight
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
            loss_sum += loss.detach().float() * weight
            window.add_metrics(metrics)
        return _mean_across_ranks(loss_sum, ctx)

    def _unscale_and_clip(self, run: _Run, loss_value: float) -> tuple[bool, float]:
        """Whether the step may update the weights, and the gradient norm before clipping."""
        # NaN/Inf anywhere (any rank, since the mean propagates it): skip the update.
        if not math.isfinite(loss_value):
            return False, math.nan
        if run.scaler is not None:
            run.scaler.unscale_(run.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(run.model.parameters(), self.config.max_grad_norm or math.inf).item()
        # With fp16 the GradScaler itself skips overflowing steps and lowers its scale.
        return run.scaler is not None or math.isfinite(grad_norm), grad_norm

    def _after_step(self, run: _Run, window: _Window, step: int, learning_rate: float) -> _Window:
        """Log, evaluate and checkpoint when `step` calls for it; return the (new) log window."""
        cfg = self.config
        if step % cfg.log_every_n_steps == 0 or step == cfg.max_steps:
            epoch = run.position.epoch + run.position.batch_index / run.sampler.batches_per_epoch
            samples_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * run.ctx.world_size
            record = self._log_record(
                run.ctx, window, step, epoch, learning_rate, run.loop.counters.skipped_steps, samples_per_step,
            )
            run.history.append(record)
            self._emit(run.ctx, record)
            window = _Window()
        if self.eval_fn is not None and (
            step == cfg.max_steps or (cfg.eval_every_n_steps and step % cfg.eval_every_n_steps == 0)
        ):
            eval_record = self._evaluate(run.ctx, run.model, run.precision, step)
            if eval_record is not None:
                run.eval_history.append(eval_record)
        if run.loop.checkpoint_due(step):
            self._save(run)
        return window

    def _save(self, run: _Run) -> None:
        rng_states = _gather_rng_states(run.ctx)  # collective: every rank takes part
        extra = {
            "data": run.position.to_extra(self.config.seed),
            "grad_scaler": run.scaler.state_dict() if run.scaler is not None else {},
        }
        run.loop.save(run.model, run.optimizer, run.scheduler, extra, rng_states)
        if run.ctx.is_distributed:
            dist.barrier()  # no rank reads or prunes checkpoints while rank 0 writes

    def _micro_batch_weights(self, batches: list[Any], ctx: DistributedContext) -> list[float]:
        """Loss weights of this rank's micro-batches: n_i * world_size / (tokens of the step on
        all ranks), since DDP then averages the gradients over ranks; 1/k without a count."""
        if self.token_count_fn is None:
            return [1.0 / len(batches)] * len(batches)
        counts = [float(self.token_count_fn(batch)) for batch in batches]
        total = torch.tensor(sum(counts), dtype=torch.float64, device=ctx.device)
        if ctx.is_distributed:
            dist.all_reduce(total)  # SUM over ranks
        # A step without tokens has a NaN loss and is skipped; the clamp only avoids 0/0.
        return [count * ctx.world_size / max(total.item(), 1.0) for count in counts]

    def _log_record(
        self,
        ctx: DistributedContext,
        window: _Window,
        step: int,
        epoch: float,
        learning_rate: float,
        skipped: int,
        samples_per_step: int,
    ) -> dict[str, float]:
        """One log record; metrics are averaged (tokens summed) across ranks."""
        metric_names = sorted(window.metric_sums)
        means = [window.metric_sums[k] / window.metric_counts[k] for k in metric_names]
        tokens = window.metric_sums.get(TOKENS_METRIC, 0.0)
        if ctx.is_distributed:
            _check_same_keys(metric_names, ctx)
            reduced = torch.tensor([*means, tokens], dtype=torch.float64, device=ctx.device)
            dist.all_reduce(reduced)
            *means, tokens = (reduced / ctx.world_size).tolist()
            tokens *= ctx.world_size
        seconds_per_step = window.seconds / window.steps
        record: dict[str, float] = {"step": step}
        # loss_fn's metrics first, so the trainer's own keys win on a name clash.
        for name, value in zip(metric_names, means, strict=True):
            if name != TOKENS_METRIC:
                record[f"train/{name}"] = value
        record |= {
            "train/loss": sum(window.losses) / len(window.losses) if window.losses else math.nan,
            "train/learning_rate": learning_rate,
            "train/grad_norm": (
                sum(window.grad_norms) / len(window.grad_norms) if window.grad_norms else math.nan
            ),
            "train/epoch": epoch,
            "train/skipped_steps": skipped,
            "perf/step_seconds": seconds_per_step,
            "perf/samples_per_second": samples_per_step / seconds_per_step,
            "perf/eta_seconds": (self.config.max_steps - step) * seconds_per_step,
        }
        if TOKENS_METRIC in window.metric_sums:
            record["perf/tokens_per_second"] = tokens / window.seconds
        return record

    def _emit(self, ctx: DistributedContext, record: dict[str, float]) -> None:
        if ctx.is_main:
            for callback in self.callbacks:
                callback(record)

    def _evaluate(
        self, ctx: DistributedContext, model: nn.Module, precision: str, step: int
    ) -> dict[str, float] | None:
        """Run eval_fn on rank 0. The RNG is forked so whatever randomness evaluation uses
        (sampling, say) never shifts the training random stream, which keeps resume exact."""
        if not ctx.is_main or self.eval_fn is None:
            return None
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        model.eval()
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                with _autocast(ctx.device, precision):
                    metrics = self.eval_fn(model)
        finally:
            model.train()
        record: dict[str, float] = {"step": step}
        record.update({f"eval/{name}": float(value) for name, value in metrics.items()})
        self._emit(ctx, record)
        return record


def _model_config(model: nn.Module) -> dict[str, Any]:
    config = getattr(unwrap_model(model), "config", None)
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if is_dataclass(config):
        return asdict(config)
    raise TypeError(
        f"model.config is a {type(config).__name__}; pass model_config= (a JSON-able dict) "
        "so checkpoints can be fingerprinted"
    )


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs CUDA (its GradScaler); use bf16 or fp32 on CPU")
    return precision


def _autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _mix_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for (seed, epoch); unlike seed + epoch, (0, 1) and (1, 0) differ."""
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


def _mean_across_ranks(value: torch.Tensor, ctx: DistributedContext) -> float:
    if ctx.is_distributed:
        value = value.clone()
        dist.all_reduce(value)  # SUM: gloo has no AVG
        value /= ctx.world_size
    return value.item()


def _check_same_keys(names: list[str], ctx: DistributedContext) -> None:
    """Metric keys must match across ranks, or the all_reduce of their values would mix up
    metrics or hang on a size mismatch."""
    signature = int.from_bytes(hashlib.sha256("\0".join(names).encode()).digest()[:6], "little")
    bounds = torch.tensor([signature, -signature], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    if bounds[0].item() != signature or -bounds[1].item() != signature:
        raise RuntimeError(
            f"loss_fn returned different metric keys on different ranks (rank {ctx.rank}: {names})"
        )


def _gather_rng_states(ctx: DistributedContext) -> list[dict[str, torch.Tensor]]:
    """Every rank's RNG states (index = rank), gathered as flat byte tensors."""
    local = capture_rng_state(ctx.device)
    if not ctx.is_distributed:
        return [local]
    names = sorted(local)
    sizes = [local[name].numel() for name in names]
    flat = torch.cat([local[name] for name in names]).to(ctx.device)
    gathered = [torch.empty_like(flat) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, flat)
    return [
        {name: part.clone() for name, part in zip(names, tensor.cpu().split(sizes), strict=True)}
        for tensor in gathered
    ]

