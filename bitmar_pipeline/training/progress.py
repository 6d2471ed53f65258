"""Terminal progress of a training stage, for `bitmar run` (not for `dagster dev`, whose UI
has the run's log): a tqdm bar with ETA redrawn in place on a TTY, or, when the stream is not a
TTY (CI, a pipe, a file), one line at 25, 50, 75 and 100% of the steps.

It is a step-record callback like the others the stages take (`callbacks=[history, *callbacks]`
in stages.py): the Trainer calls it every `training.log_every_n_steps` steps, GRPO every step,
both on rank 0 only. bitmar_model knows nothing of terminals; the training assets add it when
`BitmarSettings.console_progress` is set, which the CLI does (not with --verbose, whose full
Dagster log would tear the bar).
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from tqdm import tqdm

from bitmar_pipeline.config import PipelineConfig
from bitmar_pipeline.training.stages import GRPO, PRETRAIN, SFT

# Shown next to the step count, first present wins (the Trainer's loss, GRPO's loss and reward).
_LOSS_KEYS = ("train/loss", "train/grpo_reasoning_loss")
_REWARD_KEY = "reward/total"
LINE_FORMAT = "{desc}: step {n_fmt}/{total_fmt} ({percentage:.0f}%){postfix} [elapsed {elapsed}, ETA {eta}]"
# tqdm's own rate and ETA would count the stage's setup (data, model) as training time: the ETA
# here comes from the time between records (postfix), the rest of the bar is tqdm's.
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
QUARTERS = 4


def stage_steps(config: PipelineConfig, stage: str) -> int:
    """The step a stage trains to (its bar's total)."""
    return {
        PRETRAIN: config.training.pretrain.max_steps,
        SFT: config.training.sft.max_steps,
        GRPO: config.grpo_reasoning.steps,
    }[stage]


class TrainingProgress:
    """A callback (record -> None) that shows `record["step"]` out of `total` on `file` (stderr).
    `tty` None: whether `file` is a terminal; `mininterval`: the least seconds between redraws.
    Use as a context manager, or call close()."""

    def __init__(
        self, stage: str, total: int, file: IO[str] | None = None, tty: bool | None = None, mininterval: float = 0.5
    ) -> None:
        self.stage, self.total, self.mininterval = stage, total, mininterval
        self.file = file if file is not None else sys.stderr
        self.tty = self.file.isatty() if tty is None else tty
        self.started = time.time()  # tqdm's clock
        self.next_quarter = 1
        self.last: tuple[int, float] | None = None  # (step, time) of the previous record
        self.bar: tqdm | None = None  # drawn at the first record: a stage reused from storage shows nothing

    @staticmethod
    def _postfix(record: dict[str, Any]) -> str:
        shown = {}
        loss = next((record[k] for k in _LOSS_KEYS if isinstance(record.get(k), int | float)), None)
        if loss is not None:
            shown["loss"] = loss
        if isinstance(record.get(_REWARD_KEY), int | float):
            shown["reward"] = record[_REWARD_KEY]
        return ", ".join(f"{k}={v:.4g}" for k, v in shown.items())

    def _eta(self, step: int, record: dict[str, Any]) -> str:
        """Seconds per step since the previous record (the Trainer's window mean, or the time since
        the start, at the first) times the steps left."""
        now = time.time()
        if self.last is not None and step > self.last[0]:
            per_step = (now - self.last[1]) / (step - self.last[0])
        elif isinstance(record.get("perf/step_seconds"), int | float):
            per_step = float(record["perf/step_seconds"])
        else:
            per_step = (now - self.started) / max(step, 1)
        self.last = (step, now)
        return tqdm.format_interval((self.total - step) * per_step)

    def __call__(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if not isinstance(step, int | float):
            return
        step = min(int(step), self.total)
        postfix, eta = self._postfix(record), self._eta(step, record)
        if self.tty:
            if self.bar is None:
                self.bar = tqdm(
                    total=self.total, desc=self.stage, unit="step", file=self.file, dynamic_ncols=True,
                    mininterval=self.mininterval, bar_format=BAR_FORMAT,
                )
                self.bar.start_t = self.started  # elapsed counts from the stage's start
            self.bar.set_postfix_str(", ".join(f for f in (f"ETA {eta}", postfix) if f), refresh=False)
            self.bar.update(step - self.bar.n)
            if step >= self.total:
                self.close()  # now, so the finished bar keeps the training time (not evaluation's after it)
            return
        if step * QUARTERS < self.next_quarter * self.total:
            return
        # One line even when a record crosses several quarters (a coarse log interval).
        self.next_quarter = step * QUARTERS // self.total + 1
        line = tqdm.format_meter(
            step, self.total, time.time() - self.started, prefix=self.stage, unit="step",
            postfix=postfix, bar_format=LINE_FORMAT, eta=eta,
        )
        print(line, file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> TrainingProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
