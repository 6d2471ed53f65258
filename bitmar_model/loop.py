"""The loop machinery every training loop shares: resume, the non-finite-step policy and
periodic checkpoints.

`Trainer` (supervised stages) and `train_grpo` (GRPO) differ in what one step does; where a
run stands (step, skipped and consecutive non-finite steps), how it resumes from the latest
checkpoint (weights, optimizer, scheduler, RNG) and when it writes a checkpoint are owned
here, once:

    loop = StepLoop(LoopSettings(max_steps=100, checkpoint_dir="ckpt"), run_config, device="cpu")
    extra = loop.resume(model, optimizer, scheduler)   # None on a fresh run
    while not loop.done:
        finite = one_step()
        step = loop.finish_step(finite)                # raises TrainingDivergedError
        if loop.checkpoint_due(step):
            loop.save(model, optimizer, scheduler, extra={...})
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from bitmar_model.checkpoint import load_latest_checkpoint, restore, save_checkpoint


class TrainingDivergedError(RuntimeError):
    """Too many consecutive non-finite steps. The last good checkpoint is left untouched."""

    def __init__(self, step: int, consecutive_steps: int, last_checkpoint: Path | None) -> None:
        self.step = step
        self.last_checkpoint = last_checkpoint
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else (
            "no checkpoint was written before it"
        )
        super().__init__(
            f"training diverged at step {step}: {consecutive_steps} consecutive steps with a "
            f"non-finite loss or gradient; {where}"
        )


@dataclass(frozen=True)
class LoopSettings:
    """How long a loop runs, when it checkpoints and how many non-finite steps it tolerates."""

    max_steps: int
    checkpoint_dir: str | Path | None = None  # None: no checkpoints, no resume
    save_every_n_steps: int = 0  # 0: only at the end
    keep_last_checkpoints: int | None = None  # None keeps every checkpoint
    max_consecutive_nan_steps: int = 5


@dataclass
class LoopCounters:
    """Where a run stands; saved in every checkpoint (extra["counters"]) so a resume continues here."""

    step: int = 0  # optimizer steps done (skipped ones included)
    skipped_steps: int = 0
    consecutive_nan_steps: int = 0

    def to_extra(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "consecutive_nan_steps": self.consecutive_nan_steps}


class StepLoop:
    """Counters, resume and checkpoints of one run. Under DDP every rank holds one; only
    `is_main` writes, and the caller gathers the ranks' RNG states and provides the barrier."""

    def __init__(
        self,
        settings: LoopSettings,
        run_config: Mapping[str, Any],
        device: torch.device | str,
        *,
        rank: int = 0,
        is_main: bool = True,
    ) -> None:
        self.settings = settings
        self.run_config = run_config
        self.device = device
        self.rank = rank
        self.is_main = is_main
        self.counters = LoopCounters()
        self.last_checkpoint: Path | None = None
        self.resumed_from: int | None = None

    @property
    def step(self) -> int:
        return self.counters.step

    @property
    def done(self) -> bool:
        return self.counters.step >= self.settings.max_steps

    def resume(self, model: nn.Module, optimizer: Optimizer, scheduler: LRScheduler) -> dict[str, Any] | None:
        """Restore the latest checkpoint of this run config (refusing another config's) and
        return its `extra`; None when there is nothing to resume."""
        if self.settings.checkpoint_dir is None:
            return None
        checkpoint = load_latest_checkpoint(self.settings.checkpoint_dir, self.run_config)
        if checkpoint is None:
            return None
        extra = restore(checkpoint, model, optimizer, scheduler, self.rank, device=self.device)
        counters = extra["counters"]
        self.counters = LoopCounters(checkpoint.step, counters["skipped_steps"], counters["consecutive_nan_steps"])
        self.resumed_from = checkpoint.step
        self.last_checkpoint = checkpoint.path if self.is_main else None
        return extra

    def finish_step(self, finite: bool) -> int:
        """Count one step (skipped when not `finite`) and return its number; raise before any
        save once too many steps in a row were non-finite, so a diverged state is never saved."""
        counters = self.counters
        if finite:
            counters.consecutive_nan_steps = 0
        else:
            counters.skipped_steps += 1
            counters.consecutive_nan_steps += 1
        counters.step += 1
        if counters.consecutive_nan_steps >= self.settings.max_consecutive_nan_steps:
            raise TrainingDivergedError(counters.step, counters.consecutive_nan_steps, self.last_checkpoint)
        return counters.step

    def checkpoint_due(self, step: int) -> bool:
        every = self.settings.save_every_n_steps
        return self.settings.checkpoint_dir is not None and (
            step == self.settings.max_steps or bool(every and step % every == 0)
        )

    def save(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        scheduler: LRScheduler,
        extra: Mapping[str, Any],
        rng_states: list[dict[str, torch.Tensor]] | None = None,
    ) -> Path | None:
        """Write a checkpoint of the current step with the counters added to `extra`."""
        if self.settings.checkpoint_dir is None:
            raise ValueError("StepLoop.save: no checkpoint_dir")
        path = save_checkpoint(
            self.settings.checkpoint_dir, self.counters.step, model, optimizer, scheduler,
            {**extra, "counters": self.counters.to_extra()}, self.run_config, self.is_main,
            device=self.device, rng_states=rng_states, keep_last=self.settings.keep_last_checkpoints,
        )
        self.last_checkpoint = path
        return path
