"""Training stages: multimodal pretraining -> reasoning SFT -> GRPO. Each reads its upstream
from storage, so one stage can be re-run alone (say GRPO with a new reward weight)."""

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import dagster as dg

from assets.data import text_tokenizer, vision_features
from assets.metadata import image_metadata, table_preview
from assets.operations import GPU_POOL, UPSTREAM_CHANGED
from assets.versions import CODE_VERSIONS
from bitmar_pipeline.data.coco import manifest_shards
from bitmar_pipeline.evaluation.figures import curve_figure
from bitmar_pipeline.resources.settings import BitmarSettings, VisionEncoderResource
from bitmar_pipeline.resources.tracking import CarbonTrackerResource, WandbResource
from bitmar_pipeline.training.launch import (
    RESULT_MESSAGE,
    build_torchrun_command,
    result_from_payload,
    step_line,
    torchrun_env,
)
from bitmar_pipeline.training.progress import TrainingProgress, stage_steps
from bitmar_pipeline.training.stages import (
    GRPO,
    PRETRAIN,
    SFT,
    StageResult,
    run_grpo,
    run_multimodal_pretrain,
    run_reasoning_sft,
)

TRAINING_GROUP = "training"


def _step_logger(context: dg.AssetExecutionContext, stage: str) -> Callable[[dict[str, Any]], None]:
    return lambda record: context.log.info(step_line(stage, record))


def _curves(
    result: StageResult, settings: BitmarSettings, names: tuple[str, ...], title: str
) -> dict[str, dg.MetadataValue]:
    curves = {name: [(r["step"], r[name]) for r in result.history if name in r] for name in names}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return {}
    path = curve_figure(curves, title, settings.storage.path("reports", result.stage, f"{result.stage}_curves.png"))
    return image_metadata(path)


Launched = tuple[StageResult, Mapping[str, dg.MetadataValue]]


def _torchrun(
    context: dg.AssetExecutionContext,
    client: dg.PipesSubprocessClient,
    settings: BitmarSettings,
    stage: str,
    **launch_args: Any,
) -> Launched:
    """The stage under torchrun through Dagster Pipes (bitmar_pipeline/training/launch.py): rank 0 streams
    its log lines into this run, logs to W&B, and reports the materialization and its StageResult."""
    nproc = settings.config.compute.nproc_per_node
    command = build_torchrun_command(
        stage, settings, nproc, wandb_run_name=f"{stage}-{context.run.run_id[:8]}",
        progress=settings.console_progress, **launch_args,
    )
    context.log.info(f"{stage}: launching torchrun with {nproc} processes")
    invocation = client.run(command=command, context=context, env=torchrun_env(nproc))
    reported = invocation.get_materialize_result()
    payload = next(
        (m[RESULT_MESSAGE] for m in invocation.get_custom_messages() if isinstance(m, dict) and RESULT_MESSAGE in m),
        None,
    )
    if payload is None:
        raise dg.Failure(f"{stage}: torchrun exited without rank 0 reporting a result")
    return result_from_payload(payload), reported.metadata


def _train(
    context: dg.AssetExecutionContext, settings: BitmarSettings, wandb: WandbResource, carbon: CarbonTrackerResource,
    stage: str, run: Callable[[list[Callable[[dict[str, Any]], None]]], StageResult], curve_names: tuple[str, ...],
    launch: Callable[[], Launched] | None = None,
) -> tuple[StageResult, dict[str, dg.MetadataValue]]:
    """`run` trains in this process; `launch`, when given and compute.nproc_per_node > 1, under torchrun."""
    config, storage = settings.config, settings.storage
    nproc = config.compute.nproc_per_node
    if nproc > 1 and launch is None:
        context.log.info(
            f"{stage} runs in one process although compute.nproc_per_node={nproc}: "
            "it is sampling-bound on a small model (see bitmar_pipeline/training/launch.py)"
        )
    reported: Mapping[str, dg.MetadataValue] = {}
    links: dict[str, dg.MetadataValue] = {}
    with carbon.track(config.carbon_tracking, stage, storage.path("emissions")) as emissions:
        if nproc > 1 and launch is not None:
            result, reported = launch()
        else:
            with wandb.run(
                config.wandb,
                f"{stage}-{context.run.run_id[:8]}",
                {"stage": stage, **config.model_dump(mode="json")},
                storage.path("wandb"),
            ) as logger:
                # `bitmar run` only: a bar (or four lines) with ETA on stderr; the log keeps every step line.
                progress = TrainingProgress(stage, stage_steps(config, stage)) if settings.console_progress else None
                with progress or contextlib.nullcontext():
                    result = run([_step_logger(context, stage), logger.log, *([progress] if progress else [])])
                logger.summary({f"{stage}/{k}": v for k, v in result.metrics.items() if isinstance(v, int | float)})
                links = logger.link_metadata()
    emitted = emissions[0]
    last = next((r for r in reversed(result.history) if "train/loss" in r or "train/grpo_reasoning_loss" in r), {})
    metadata: dict[str, Any] = {
        "model_dir": dg.MetadataValue.path(str(result.model_dir)),
        "final_step": result.final_step,
        "resumed_from_step": result.resumed_from_step if result.resumed_from_step is not None else "fresh start",
        "fingerprint": result.fingerprint,
        "seconds": round(result.seconds, 1),
        "samples_per_second": round(float(last.get("perf/samples_per_second", 0.0)), 2),
        "tokens_per_second": round(float(last.get("perf/tokens_per_second", 0.0)), 1),
        "final_loss": round(float(last.get("train/loss", last.get("train/grpo_reasoning_loss", float("nan")))), 4),
        **emitted.metadata(),
        **{
            k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in result.metrics.items()
            if isinstance(v, int | float)
        },
        **{f"table_{name}": table_preview(table, max_rows=20) for name, table in result.tables.items()},
        **_curves(result, settings, curve_names, stage),
        **links,
        **reported,  # rank 0's own report (world_size and the values above) when launched
    }
    context.log.info(f"{stage}: {emitted.kg_co2eq:.2e} kg CO2-eq, {emitted.energy_kwh:.2e} kWh")
    return result, metadata


def _train_on_features(
    context: dg.AssetExecutionContext, settings: BitmarSettings, vision_encoder: VisionEncoderResource,
    wandb: WandbResource, carbon: CarbonTrackerResource, client: dg.PipesSubprocessClient,
    stage: str, run: Callable[..., StageResult], curve_names: tuple[str, ...],
) -> dg.MaterializeResult:
    """A stage that reads the cached features of every registered shard (pretraining, and SFT
    for its caption rehearsal): in this process, or under torchrun with the same inputs."""
    fingerprint = vision_encoder.get(settings).fingerprint
    shards = manifest_shards(settings.storage)
    result, metadata = _train(
        context, settings, wandb, carbon, stage,
        lambda callbacks: run(settings.config, settings.storage, shards, fingerprint, callbacks),
        curve_names,
        lambda: _torchrun(context, client, settings, stage, encoder_fingerprint=fingerprint, shards=shards),
    )
    # The stage fingerprint (settings, model, data, encoder) is the data version: same inputs, same model.
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(result.fingerprint))


@dg.asset(
    deps=[vision_features, text_tokenizer],
    group_name=TRAINING_GROUP,
    automation_condition=UPSTREAM_CHANGED,
    code_version=CODE_VERSIONS["multimodal_pretrain"],
    kinds={"pytorch"},
    pool=GPU_POOL,
    description=(
        "Caption language modelling conditioned on image and memory, InfoNCE "
        "image-text alignment and memory regularisation."
    ),
)
def multimodal_pretrain(
    context: dg.AssetExecutionContext, settings: BitmarSettings, vision_encoder: VisionEncoderResource,
    wandb: WandbResource, carbon: CarbonTrackerResource, pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    return _train_on_features(
        context, settings, vision_encoder, wandb, carbon, pipes_subprocess_client, PRETRAIN, run_multimodal_pretrain,
        ("train/loss", "train/text_generation_loss", "train/cross_modal_loss", "train/cross_modal_similarity"),
    )


@dg.asset(
    deps=[multimodal_pretrain, "robot_selection_tasks", vision_features],
    group_name=TRAINING_GROUP,
    automation_condition=UPSTREAM_CHANGED,
    code_version=CODE_VERSIONS["reasoning_sft"],
    kinds={"pytorch"},
    pool=GPU_POOL,
    description=(
        "Supervised reasoning on robot tasks: tagged reasoning targets built "
        "from the data, multi-label selection head, caption rehearsal."
    ),
)
def reasoning_sft(
    context: dg.AssetExecutionContext, settings: BitmarSettings, vision_encoder: VisionEncoderResource,
    wandb: WandbResource, carbon: CarbonTrackerResource, pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    return _train_on_features(
        context,
        settings,
        vision_encoder,
        wandb,
        carbon,
        pipes_subprocess_client,
        SFT,
        run_reasoning_sft,
        (
            "train/loss",
            "train/text_generation_loss",
            "train/selection_loss",
            "train/caption_rehearsal_loss",
            "train/robot_selection_accuracy",
        ),
    )


@dg.asset(
    deps=[reasoning_sft],
    group_name=TRAINING_GROUP,
    automation_condition=UPSTREAM_CHANGED,
    code_version=CODE_VERSIONS["grpo_policy"],
    kinds={"pytorch"},
    pool=GPU_POOL,
    description=(
        "Group Relative Policy Optimization of the generated reasoning against "
        "the frozen SFT model (reward: selection, format, consistency, calibration)."
    ),
)
def grpo_policy(
    context: dg.AssetExecutionContext, settings: BitmarSettings, wandb: WandbResource, carbon: CarbonTrackerResource
) -> dg.MaterializeResult:
    result, metadata = _train(
        context, settings, wandb, carbon, GRPO,
        lambda callbacks: run_grpo(settings.config, settings.storage, callbacks),
        ("reward/total", "reward/selection", "reward/format", "reward/consistency", "reward/calibration", "grpo/kl"),
    )
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(result.fingerprint))
