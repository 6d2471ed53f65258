"""One training stage under torchrun, reporting back to Dagster through Pipes.

With `compute.nproc_per_node > 1` the training assets run, through `dg.PipesSubprocessClient`,

    python -m torch.distributed.run --standalone --nproc_per_node N \\
        -m bitmar_pipeline.training.launch --stage multimodal_pretrain --settings-json '{...}'

Every rank runs the same stage function (the Trainer sets up DDP itself: gloo on CPU, NCCL
on CUDA). Rank 0 alone opens Dagster Pipes: each training log record becomes a line in the
run's event log as it happens, W&B logs from here, and at the end rank 0 reports the
materialization (final step, model_dir, fingerprint, metrics) plus the whole StageResult as
a custom message, so the asset builds the same metadata (curves, tables) as in-process.
Launched from a shell (no DAGSTER_PIPES_CONTEXT) rank 0 logs to stdout instead.

GRPO is not launchable: each step samples groups from a small model token by token, so a
second process would spend its time waiting on the first at every gradient sync; the asset
runs it in-process whatever nproc_per_node says, and logs that it does.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from dagster_pipes import PipesContext, PipesEnvVarParamsLoader, open_dagster_pipes

from bitmar_pipeline.data.coco import manifest_shards
from bitmar_pipeline.resources.settings import BitmarSettings, VisionEncoderResource
from bitmar_pipeline.resources.tracking import WandbResource
from bitmar_pipeline.training.progress import TrainingProgress, stage_steps
from bitmar_pipeline.training.stages import (
    PRETRAIN,
    SFT,
    Log,
    StageResult,
    is_main_process,
    run_multimodal_pretrain,
    run_reasoning_sft,
)

LAUNCHABLE_STAGES = (PRETRAIN, SFT)
RESULT_MESSAGE = "stage_result"  # key of the custom Pipes message that carries the StageResult
LOGGED_EACH_STEP = (
    "train/loss",
    "train/learning_rate",
    "perf/samples_per_second",
    "perf/eta_seconds",
    "reward/total",
    "grpo/kl",
)


def _usable_cores() -> int:
    # The CPU set this process may run on (a container's limit), not the host's core count.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def torchrun_env(nproc_per_node: int, cores: int | None = None) -> dict[str, str]:
    """OpenMP settings for N ranks sharing this machine's cores; an explicit OMP_NUM_THREADS wins.

    Without them every rank starts one OpenMP thread per core and N ranks oversubscribe the
    machine N-fold; torchrun's own fallback is a single thread whatever the core count."""
    threads = max(1, (cores or _usable_cores()) // nproc_per_node)
    return {
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),  # see bitmar_pipeline/__init__.py
    }


def settings_json(settings: BitmarSettings) -> str:
    """The settings for another process: paths made absolute so its working directory does not matter."""
    config_file = str(Path(settings.config_file).resolve()) if settings.config_file else None
    overrides = {**settings.overrides, "storage.root": str(settings.storage.root)}
    return json.dumps({"config_file": config_file, "overrides": overrides})


def build_torchrun_command(
    stage: str, settings: BitmarSettings, nproc_per_node: int, *,
    encoder_fingerprint: str | None = None, shards: Sequence[str] | None = None, wandb_run_name: str | None = None,
    progress: bool = False,
) -> list[str]:
    if stage not in LAUNCHABLE_STAGES:
        raise ValueError(
            f"{stage} is not launched under torchrun (only {', '.join(LAUNCHABLE_STAGES)}); GRPO runs in one process"
        )
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc_per_node),
        "-m", "bitmar_pipeline.training.launch", "--stage", stage, "--settings-json", settings_json(settings),
    ]
    if encoder_fingerprint:
        command += ["--encoder-fingerprint", encoder_fingerprint]
    if shards:
        command += ["--shards", ",".join(shards)]
    if wandb_run_name:
        command += ["--wandb-run-name", wandb_run_name]
    if progress:
        command.append("--progress")
    return command


def step_line(stage: str, record: dict[str, Any]) -> str:
    shown = ", ".join(
        f"{k.split('/')[-1]}={record[k]:.4g}" for k in LOGGED_EACH_STEP if isinstance(record.get(k), int | float)
    )
    return f"{stage} step {record.get('step')}: {shown}"


def _plain(value: Any) -> Any:
    """numpy scalars (metrics, history) as Python numbers, anything else as text: Pipes writes plain JSON."""
    return value.item() if hasattr(value, "item") else str(value)


def result_payload(result: StageResult) -> dict[str, Any]:
    """A StageResult as JSON; evaluations (objects around the model) stay behind, their tables travel."""
    payload = {
        "stage": result.stage, "model_dir": str(result.model_dir), "fingerprint": result.fingerprint,
        "final_step": result.final_step, "resumed_from_step": result.resumed_from_step, "history": result.history,
        "metrics": result.metrics, "seconds": result.seconds,
        "tables": {name: table.to_json(orient="split", index=False) for name, table in result.tables.items()},
    }
    return json.loads(json.dumps(payload, default=_plain))


def result_from_payload(payload: dict[str, Any]) -> StageResult:
    tables = {
        name: pd.read_json(io.StringIO(text), orient="split", dtype=False) for name, text in payload["tables"].items()
    }
    return StageResult(
        payload["stage"],
        Path(payload["model_dir"]),
        payload["fingerprint"],
        payload["final_step"],
        payload["resumed_from_step"],
        payload["history"],
        payload["metrics"],
        payload["seconds"],
        tables,
    )


def materialization_metadata(result: StageResult, world_size: int) -> dict[str, Any]:
    """What rank 0 reports, in Pipes' raw form (numbers and text are typed on the Dagster side)."""
    metrics = {
        k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.metrics.items() if isinstance(v, int | float)
    }
    return {
        "model_dir": {"raw_value": str(result.model_dir), "type": "path"},
        "final_step": result.final_step, "fingerprint": result.fingerprint, "world_size": world_size, **metrics,
    }


def _run_stage(
    stage: str,
    settings: BitmarSettings,
    encoder_fingerprint: str | None,
    shards: Sequence[str] | None,
    callbacks: Sequence[Log],
) -> StageResult:
    # From a shell these are worked out here, as the asset does before launching.
    shards = shards or manifest_shards(settings.storage)
    encoder_fingerprint = encoder_fingerprint or VisionEncoderResource().get(settings).fingerprint
    run = run_reasoning_sft if stage == SFT else run_multimodal_pretrain
    return run(settings.config, settings.storage, shards, encoder_fingerprint, callbacks)


def _run_main_rank(
    args: argparse.Namespace, settings: BitmarSettings, log: logging.Logger, pipes: PipesContext | None
) -> None:
    config = settings.config
    run_name = args.wandb_run_name or f"{args.stage}-torchrun"
    with WandbResource().run(
        config.wandb, run_name, {"stage": args.stage, **config.model_dump(mode="json")}, settings.storage.path("wandb")
    ) as logger, contextlib.ExitStack() as stack:
        # Rank 0's stderr is the terminal of `bitmar run` (Pipes forwards the subprocess's stdio).
        total = stage_steps(config, args.stage)
        progress = [stack.enter_context(TrainingProgress(args.stage, total))] if args.progress else []
        result = _run_stage(
            args.stage,
            settings,
            args.encoder_fingerprint,
            args.shards,
            [lambda record: log.info(step_line(args.stage, record)), logger.log, *progress],
        )
        logger.summary({f"{args.stage}/{k}": v for k, v in result.metrics.items() if isinstance(v, int | float)})
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    log.info(
        f"{args.stage}: step {result.final_step} on {world_size} rank(s) "
        f"in {result.seconds:.1f}s, model in {result.model_dir}"
    )
    if pipes is not None:
        pipes.report_custom_message({RESULT_MESSAGE: result_payload(result)})
        pipes.report_asset_materialization(metadata=materialization_metadata(result, world_size))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bitmar_pipeline.training.launch", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--stage", required=True, choices=LAUNCHABLE_STAGES)
    parser.add_argument(
        "--settings-json", required=True, help='{"config_file": ..., "overrides": {...}} as for the settings resource'
    )
    parser.add_argument(
        "--encoder-fingerprint", help="default: load the configured vision encoder and take its fingerprint"
    )
    parser.add_argument(
        "--shards",
        type=lambda text: [s for s in text.split(",") if s],
        help="comma list (default: the manifest's shards)",
    )
    parser.add_argument("--wandb-run-name")
    parser.add_argument("--progress", action="store_true", help="rank 0 draws a progress bar with ETA on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = BitmarSettings(**json.loads(args.settings_json))
    if not is_main_process():
        _run_stage(args.stage, settings, args.encoder_fingerprint, args.shards, ())
    elif PipesEnvVarParamsLoader().is_dagster_pipes_process():
        # Every rank inherits the Pipes environment; a second writer would close the session twice.
        with open_dagster_pipes() as pipes:
            _run_main_rank(args, settings, pipes.log, pipes)
    else:
        logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(message)s")
        _run_main_rank(args, settings, logging.getLogger("bitmar.launch"), None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
