"""evaluation_report: the latest model measured on validation and test, with baselines,
bootstrap intervals, figures, W&B logging and threshold checks. Re-runnable alone.

The threshold checks are blocking when the release would be published (`huggingface_hub.enabled`
and `require_passing_checks`, the default): a failure is an error and Dagster does not run
hub_release after it in the same run; a local-only release is built anyway, listing them. Their
outcome is also stored beside the report (`reports/evaluation_checks.json`), so hub_release
launched in a later run refuses the same model and lists the checks in its metadata."""

import time
from pathlib import Path
from typing import Any

import dagster as dg

from assets.metadata import image_metadata, table_preview
from assets.operations import UPSTREAM_CHANGED
from assets.training import grpo_policy
from assets.versions import CODE_VERSIONS
from bitmar_model.io import atomic_write_json, read_json
from bitmar_pipeline.evaluation.report import (
    EvaluationResult,
    ThresholdCheck,
    build_evaluation_report,
    reasoning_quality_table,
    summary_metrics,
    threshold_checks,
)
from bitmar_pipeline.evaluation.robustness import headline_metadata
from bitmar_pipeline.resources.settings import BitmarSettings, VisionEncoderResource
from bitmar_pipeline.resources.tracking import WandbResource
from bitmar_pipeline.storage import Storage

REPORT_FILE = "evaluation_report.json"
CHECKS_FILE = "evaluation_checks.json"
# Report sections shown whole, as JSON, in the metadata panel.
JSON_SECTIONS = ("vision_language", "vision_language_after_pretraining", "multi_robot", "flops_per_forward")
CHECKS = [
    dg.AssetCheckSpec(name, asset="evaluation_report", blocking=True)
    for name in (
        "test_head_top1",
        "test_head_sample_f1",
        "test_head_top1_gain_over_majority",
        "test_head_f1_vs_tfidf",
        "reasoning_format_compliance",
        "retrieval_i2t_recall_at_5",
        "head_confidence_calibrated",
    )
]


def _outcome(check: ThresholdCheck) -> dict[str, Any]:
    return {
        "name": check.name,
        "passed": bool(check.passed),
        "value": round(check.value, 4),
        "threshold": check.threshold,
        "direction": ">=" if check.higher_is_better else "<=",
    }


def _check(check: ThresholdCheck, blocking: bool) -> dg.AssetCheckResult:
    outcome = _outcome(check)
    return dg.AssetCheckResult(
        check_name=check.name,
        passed=outcome.pop("passed"),
        # Only an ERROR failure of a blocking check stops the downstream hub_release.
        severity=dg.AssetCheckSeverity.ERROR if blocking else dg.AssetCheckSeverity.WARN,
        metadata={k: v for k, v in outcome.items() if k != "name"},
    )


def read_check_outcomes(storage: Storage) -> list[dict[str, Any]] | None:
    """The threshold checks of the latest evaluation_report (None before its first run)."""
    path = storage.path("reports", CHECKS_FILE)
    if not path.is_file():
        return None
    return read_json(path, lambda cause: dg.Failure(f"cannot read {path}: {cause}; re-materialize evaluation_report"))[
        "checks"
    ]


def _report_metadata(result: EvaluationResult, path: Path, flat: dict[str, float], seconds: float) -> dict[str, Any]:
    report = result.report
    unusable_keys = ("stated_confidence_missing", "stated_confidence_out_of_range")
    metadata = {
        "report": dg.MetadataValue.path(str(path)),
        "seconds": round(seconds, 1),
        **{k.replace("/", "_"): round(float(v), 4) for k, v in flat.items()},
        "robot_selection": table_preview(result.tables["robot_selection"], max_rows=40),
        "reasoning_quality": table_preview(reasoning_quality_table(report), max_rows=20),
        "stated_confidence_unusable": dg.MetadataValue.json(
            {split: {k: section[k] for k in unusable_keys} for split, section in report["reasoning"].items()}
        ),
        "stated_confidence_target": dg.MetadataValue.text(report["reasoning"]["test"]["stated_confidence_target"]),
        "test_examples": table_preview(result.tables["test_examples"]),
        **headline_metadata(report["user_phrased"]),
        "readme_examples": dg.MetadataValue.json(report["user_phrased"]["readme_examples"]["examples"]),
        **{key: dg.MetadataValue.json(report[key]) for key in JSON_SECTIONS},
    }
    if report.get("zero_shot"):  # the map that scores robots described only in the fleet
        metadata["zero_shot"] = dg.MetadataValue.json(report["zero_shot"])
    for figure in result.figures.values():
        metadata.update(image_metadata(figure))
    return metadata


@dg.asset(
    deps=[grpo_policy],
    group_name="evaluation",
    automation_condition=UPSTREAM_CHANGED,
    code_version=CODE_VERSIONS["evaluation_report"],
    kinds={"pytorch"},
    check_specs=CHECKS,
    description=(
        "Robot selection (head and generated reasoning) vs majority and TF-IDF "
        "baselines, reasoning quality, calibration, retrieval, captioning, memory, attention maps and FLOPs."
    ),
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    settings: BitmarSettings,
    vision_encoder: VisionEncoderResource,
    wandb: WandbResource,
) -> dg.MaterializeResult:
    config, storage = settings.config, settings.storage
    started = time.perf_counter()
    path = storage.path("reports", REPORT_FILE)
    result = build_evaluation_report(config, storage, lambda: vision_encoder.get(settings).fingerprint, path)
    flat = summary_metrics(result.report)
    run_name = f"evaluation-{context.run.run_id[:8]}"
    with wandb.run(config.wandb, run_name, {"stage": "evaluation_report"}, storage.path("wandb")) as logger:
        logger.log(flat)
        for figure in result.figures.values():
            logger.log_image(figure.stem, figure)
        links = logger.link_metadata()
    measured = threshold_checks(result.report, config.evaluation.thresholds)
    atomic_write_json(storage.path("reports", CHECKS_FILE), {"checks": [_outcome(c) for c in measured]})
    checks = [_check(check, config.huggingface_hub.checks_block_release) for check in measured]
    metadata = {**_report_metadata(result, path, flat, seconds=time.perf_counter() - started), **links}
    return dg.MaterializeResult(metadata=metadata, check_results=checks)
