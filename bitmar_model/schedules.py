"""Learning-rate schedule: linear warmup, then cosine decay with optional warm restarts.

`WarmupCosineSchedule` maps an optimizer step to a multiplier of the peak learning rate,
which is what `torch.optim.lr_scheduler.LambdaLR` expects. It is a small object rather than
a closure because LambdaLR saves a callable object's attributes in its state dict (plain
ints and floats, so the checkpoint still loads with `weights_only=True`) and a closure's
not at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


@dataclass
class WarmupCosineSchedule:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    - steps [0, warmup_steps): linear ramp (step + 1) / (warmup_steps + 1), so the very first
      step already learns a little instead of taking a zero-lr step;
    - step == warmup_steps: the peak, 1.0;
    - after warmup, the remaining steps are split into `cosine_restarts + 1` equal cycles;
      each starts at the peak and decays along a half cosine towards `min_lr_ratio`;
    - at and beyond `max_steps`: `min_lr_ratio`.

    After warmup the multiplier never drops below `min_lr_ratio`.
    """

    warmup_steps: int
    max_steps: int
    cosine_restarts: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ValueError(
                f"warmup_steps must be in [0, max_steps={self.max_steps}), got {self.warmup_steps}"
            )
        if self.cosine_restarts < 0:
            raise ValueError(f"cosine_restarts must be >= 0, got {self.cosine_restarts}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if step >= self.max_steps:
            return self.min_lr_ratio
        cycle_length = (self.max_steps - self.warmup_steps) / (self.cosine_restarts + 1)
        progress = ((step - self.warmup_steps) % cycle_length) / cycle_length
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


def warmup_cosine_scheduler(
    optimizer: Optimizer,
    warmup_steps: int,
    max_steps: int,
    cosine_restarts: int = 0,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """A LambdaLR that follows `WarmupCosineSchedule`; call `.step()` once per optimizer step."""
    schedule = WarmupCosineSchedule(warmup_steps, max_steps, cosine_restarts, min_lr_ratio)
    return LambdaLR(optimizer, schedule)
