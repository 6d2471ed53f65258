"""Training checkpoints: safetensors weights + a weights_only-loadable trainer state.

Layout of a checkpoint directory:

    <directory>/
        latest.json                 {"step": N, "path": "step-N"}, replaced atomically
        step-N/
            model.safetensors       model weights (shared/tied tensors stored once)
            trainer_state.pt        optimizer, scheduler, RNG states, caller's `extra`
            config.json             step, the run config and its fingerprint

Nothing is unpickled on load: `trainer_state.pt` holds only tensors, numbers, strings,
lists, tuples and dicts, and is read with `torch.load(..., weights_only=True)`.

A checkpoint is written into `.tmp-step-N.<uuid>` and renamed into place only when complete,
and `latest.json` moves to it only after that, so a run killed at any moment leaves the
previous checkpoint as the latest one.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from bitmar_model.io import TMP_PREFIX, atomic_directory, atomic_write_json

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.json"
LATEST_FILE = "latest.json"
CHECKPOINT_FILES = (MODEL_FILE, STATE_FILE, CONFIG_FILE)

_STEP_DIR = re.compile(r"^step-(\d+)$")
# Staging and set-aside folders of killed saves: bitmar_model.io's `.tmp-step-N.*` names, and
# the `step-N.tmp-*` / `step-N.old-*` names of earlier versions.
_TMP_DIR = re.compile(r"^(\.tmp-step-\d+\.(old-)?|step-\d+\.(tmp|old)-)[0-9a-f]+$")


@dataclass
class Checkpoint:
    """A complete checkpoint on disk, with its small files already read."""

    path: Path
    step: int
    config: dict[str, Any]
    fingerprint: str
    trainer_state: dict[str, Any]

    @property
    def extra(self) -> dict[str, Any]:
        """What the caller passed as `extra` to `save_checkpoint`."""
        return self.trainer_state["extra"]


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of `config` (key order and tuple/list do not matter)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers, so the
    saved state-dict keys carry no `module.` / `_orig_mod.` prefixes."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def capture_rng_state(device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """This process's torch RNG states: CPU, and the CUDA generator of `device` when it is a
    GPU (only that one, so DDP ranks do not create contexts on every GPU)."""
    device = torch.device(device)
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _check_rng_state(state: Mapping[str, torch.Tensor], device: torch.device) -> None:
    """The one rule both saving and restoring apply: a CUDA device needs its generator's state."""
    if device.type == "cuda" and "cuda" not in state:
        raise ValueError("checkpoint has no CUDA RNG state but training runs on CUDA")


def set_rng_state(state: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
    """Inverse of `capture_rng_state`."""
    device = torch.device(device)
    _check_rng_state(state, device)
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(
    directory: str | Path,
    step: int,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    extra: Mapping[str, Any],
    config: Mapping[str, Any],
    is_main: bool = True,
    *,
    device: torch.device | str,
    rng_states: list[dict[str, torch.Tensor]] | None = None,
    keep_last: int | None = None,
) -> Path | None:
    """Write `<directory>/step-<step>` atomically, point `latest.json` at it, then prune.

    `extra` holds whatever the caller needs to resume (data position, counters); it must be
    made of tensors, numbers, strings, lists, tuples and dicts. `config` is the JSON-able run
    config (model + trainer); `load_latest_checkpoint` refuses a checkpoint whose config
    fingerprint differs from the current one. `device` is the one the run trains on, the
    same that `restore` will be given: it decides which generator states are stored.
    `rng_states` is one entry per rank, as `capture_rng_state(device)` makes them (default:
    this process's); states lacking the device's generator are refused here, not at resume.
    `keep_last` keeps that many newest checkpoints.

    Only `is_main` writes (returns the checkpoint path); other ranks return None at once,
    so the caller provides the barrier that makes them wait for the files.
    """
    if not is_main:
        return None
    rng_states = rng_states if rng_states is not None else [capture_rng_state(device)]
    for state in rng_states:
        _check_rng_state(state, torch.device(device))
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step}"
    # The staging folder's files are fsynced before the swap; an orphan `final` (a run killed
    # before it updated latest.json, or one overwritten deliberately) is replaced.
    with atomic_directory(final) as tmp:
        fingerprint = config_fingerprint(config)
        save_model(
            unwrap_model(model),
            str(tmp / MODEL_FILE),
            metadata={"step": str(step), "fingerprint": fingerprint},
        )
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_states,
            "extra": dict(extra),
        }
        torch.save(state, tmp / STATE_FILE)
        record = {"step": step, "fingerprint": fingerprint, "config": config}
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    atomic_write_json(directory / LATEST_FILE, {"step": step, "path": final.name})
    _prune(directory, keep_last, keep=final)
    return final


def load_checkpoint(path: str | Path, config: Mapping[str, Any] | None = None) -> Checkpoint:
    """Read the checkpoint directory `path`. With `config`, refuse (ValueError naming the
    file and the differing keys) a checkpoint written under another config."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint directory {path} does not exist")
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if missing:
        raise ValueError(f"partial or corrupt checkpoint {path}: missing {', '.join(missing)}")
    config_path = path / CONFIG_FILE
    try:
        record = json.loads(config_path.read_text())
        step, fingerprint, saved_config = record["step"], record["fingerprint"], record["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"corrupt checkpoint config {config_path}: {error}") from error
    if config is not None and config_fingerprint(config) != fingerprint:
        differences = _config_differences(saved_config, json.loads(json.dumps(config)))
        raise ValueError(
            f"checkpoint {config_path} was written by another config (fingerprint "
            f"{fingerprint[:12]} != current {config_fingerprint(config)[:12]}): "
            f"{'; '.join(differences) or 'contents differ'}. Use another checkpoint "
            "directory or resume with the config it was trained with."
        )
    state_path = path / STATE_FILE
    try:
        trainer_state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated file, pickled objects, ...: all mean "cannot resume"
        raise ValueError(f"corrupt checkpoint state {state_path}: {error}") from error
    if trainer_state.get("step") != step:
        raise ValueError(
            f"corrupt checkpoint {path}: {STATE_FILE} is for step {trainer_state.get('step')}, "
            f"{CONFIG_FILE} for step {step}"
        )
    return Checkpoint(path, step, saved_config, fingerprint, trainer_state)


def load_latest_checkpoint(
    directory: str | Path, config: Mapping[str, Any] | None = None
) -> Checkpoint | None:
    """The checkpoint `latest.json` points to, or None when there is none yet."""
    latest_path = Path(directory) / LATEST_FILE
    if not latest_path.is_file():
        return None
    try:
        name = json.loads(latest_path.read_text())["path"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"corrupt {latest_path}: {error}") from error
    target = latest_path.parent / name
    if not target.is_dir():
        raise ValueError(f"{latest_path} points to {target}, which does not exist")
    return load_checkpoint(target, config)


def restore(
    checkpoint: Checkpoint,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    rank: int = 0,
    *,
    device: torch.device | str,
) -> dict[str, Any]:
    """Load weights, optimizer, scheduler and rank `rank`'s RNG state (for the generator of
    `device`) from `checkpoint`; return its `extra`."""
    rng_states = checkpoint.trainer_state["rng"]
    if rank >= len(rng_states):
        raise ValueError(
            f"checkpoint {checkpoint.path} has RNG states for {len(rng_states)} rank(s), "
            f"not for rank {rank}"
        )
    model_path = checkpoint.path / MODEL_FILE
    try:
        load_model(unwrap_model(model), str(model_path), strict=True)
    except RuntimeError as error:  # missing/unexpected keys or shape mismatches
        raise ValueError(f"checkpoint weights {model_path} do not fit the model: {error}") from error
    optimizer.load_state_dict(checkpoint.trainer_state["optimizer"])
    scheduler.load_state_dict(checkpoint.trainer_state["scheduler"])
    set_rng_state(rng_states[rank], device)
    return checkpoint.extra


def _config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Human-readable `key: saved (checkpoint) != current (current)` lines."""
    if isinstance(saved, dict) and isinstance(current, dict):
        lines = []
        for key in sorted(set(saved) | set(current)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved:
                lines.append(f"{name}: absent (checkpoint) != {current[key]!r} (current)")
            elif key not in current:
                lines.append(f"{name}: {saved[key]!r} (checkpoint) != absent (current)")
            else:
                lines.extend(_config_differences(saved[key], current[key], name))
        return lines
    if saved != current:
        return [f"{prefix or 'config'}: {saved!r} (checkpoint) != {current!r} (current)"]
    return []


def _prune(directory: Path, keep_last: int | None, keep: Path) -> None:
    """Delete leftovers of killed saves and all but the `keep_last` newest checkpoints
    (never `keep`, the one latest.json now points to)."""
    for entry in directory.iterdir():
        if entry.is_dir() and _TMP_DIR.match(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(f"{TMP_PREFIX}{LATEST_FILE}."):
            entry.unlink(missing_ok=True)
    if keep_last is None:
        return
    steps = sorted(
        (int(match.group(1)), entry)
        for entry in directory.iterdir()
        if entry.is_dir() and (match := _STEP_DIR.match(entry.name))
    )
    for _, entry in steps[:-keep_last]:
        if entry != keep:
            shutil.rmtree(entry)
