"""Release stages: the quantization report of the trained model, and the Hub release built
from it and the evaluation report. Both read the latest model from storage, so either can be
re-run alone."""

import dagster as dg
import pandas as pd

from assets.evaluation import read_check_outcomes
from assets.metadata import image_metadata, table_preview
from assets.operations import UPSTREAM_CHANGED, fail_without_retry
from assets.training import grpo_policy
from assets.versions import CODE_VERSIONS
from bitmar_pipeline.features.vision_encoder import resolve_model_source
from bitmar_pipeline.release.folder import ReleaseError, VisionSpec, build_release, release_files
from bitmar_pipeline.release.quantization import build_quantization_report
from bitmar_pipeline.resources.hub import HuggingFaceHubResource
from bitmar_pipeline.resources.settings import BitmarSettings

RELEASE_GROUP = "release"


def _checks_gate(settings: BitmarSettings) -> dict[str, dg.MetadataValue]:
    """The evaluation checks the release passed, as metadata; refuses the release when one failed
    and huggingface_hub.require_passing_checks is on (also when hub_release runs without them)."""
    outcomes = read_check_outcomes(settings.storage)
    required = settings.config.huggingface_hub.checks_block_release
    if outcomes is None:
        if required:
            raise dg.Failure(
                "no evaluation checks recorded: materialize evaluation_report first "
                "(or set huggingface_hub.require_passing_checks: false)",
                allow_retries=False,
            )
        return {"evaluation_checks_passed": dg.MetadataValue.text("not evaluated")}
    failed = [c for c in outcomes if not c["passed"]]
    if failed and required:
        reasons = ", ".join(f"{c['name']} {c['value']} (needs {c['direction']} {c['threshold']})" for c in failed)
        raise dg.Failure(
            f"evaluation checks failed: {reasons}; not releasing (huggingface_hub.require_passing_checks)",
            allow_retries=False,
        )
    return {
        "evaluation_checks_passed": dg.MetadataValue.json([c["name"] for c in outcomes if c["passed"]]),
        "evaluation_checks_failed": dg.MetadataValue.json([c["name"] for c in failed]),
        "evaluation_checks": table_preview(pd.DataFrame(outcomes), max_rows=None),
    }


def _sizes_table(sizes: dict) -> pd.DataFrame:
    rows = [{"component": "total", **{k: sizes[k] for k in ("fp32_bytes", "fp16_bytes", "packed_bytes")}}]
    rows += [
        {"component": name, **{k: entry[k] for k in ("fp32_bytes", "fp16_bytes", "packed_bytes")}}
        for name, entry in sizes["components"].items()
    ]
    return pd.DataFrame(rows)


@dg.asset(
    deps=[grpo_policy],
    group_name=RELEASE_GROUP,
    automation_condition=UPSTREAM_CHANGED,
    code_version=CODE_VERSIONS["quantization_report"],
    kinds={"pytorch"},
    description=(
        "Ternary weight statistics per BitLinear layer, fp32/fp16/packed sizes, "
        "packed vs trained output agreement on test prompts, CPU latency."
    ),
)
def quantization_report(context: dg.AssetExecutionContext, settings: BitmarSettings) -> dg.MaterializeResult:
    result = build_quantization_report(settings.storage)
    report = result.report
    agreement = report["agreement"]
    latency = report["latency"]
    packed = agreement["packed_vs_fake_quant"]
    context.log.info(
        f"packed vs trained: exact={packed['exactly_equal']}, max |dprob|={packed['robot_probs_max_abs_diff']:.2e}; "
        f"latency ms: " + ", ".join(f"{k}={v['median_ms']:.1f}" for k, v in latency["models"].items())
    )
    return dg.MaterializeResult(
        metadata={
            "report_path": dg.MetadataValue.path(str(result.path)),
            "bitlinear_layers": report["totals"]["bitlinear_layers"],
            "zero_fraction": report["totals"]["zero_fraction"],
            "plus_minus_balance": report["totals"]["plus_minus_balance"],
            "compression_vs_fp32": round(report["sizes"]["compression_vs_fp32"], 2),
            "packed_exactly_equal": packed["exactly_equal"],
            "layers": table_preview(result.layers, max_rows=len(result.layers)),
            "sizes_bytes": table_preview(_sizes_table(report["sizes"]), max_rows=50),
            "agreement": table_preview(
                pd.DataFrame([{"comparison": k, **v} for k, v in agreement.items() if isinstance(v, dict)]), max_rows=10
            ),
            "latency": table_preview(
                pd.DataFrame([{"model": k, **v} for k, v in latency["models"].items()]), max_rows=10, max_chars=160
            ),
            "latency_setup": (
                f"{latency['device']}, {latency['threads']} threads, batch {latency['batch_size']}, "
                f"median of {latency['models']['fake_quant']['runs']} interleaved runs"
            ),
            **image_metadata(result.figure),
        }
    )


@dg.asset(
    deps=["evaluation_report", quantization_report],
    group_name=RELEASE_GROUP,
    automation_condition=UPSTREAM_CHANGED,
    code_version=CODE_VERSIONS["hub_release"],
    kinds={"huggingface"},
    description=(
        "Release folder (weights, packed weights, tokenizer, memory, reports, model card) under "
        "<storage>/release, uploaded to the Hub when enabled and a token is available; an upload is refused "
        "while an evaluation threshold check fails (huggingface_hub.require_passing_checks)."
    ),
    # No step retry: HuggingFaceHubResource.publish retries transient upload errors itself.
)
def hub_release(
    context: dg.AssetExecutionContext, settings: BitmarSettings, hub: HuggingFaceHubResource
) -> dg.MaterializeResult:
    config, storage = settings.config, settings.storage
    checks = _checks_gate(settings)
    vision = VisionSpec(
        model=config.vision.model,
        source=resolve_model_source(config.vision.model, storage.path("models")),
        revision=config.vision.revision,
        patch_grid=config.vision.patch_grid,
    )
    with fail_without_retry(ReleaseError):
        release = build_release(storage, config, vision)
    outcome = hub.publish(
        release.path, config.huggingface_hub, release.manifest["source"]["step"], log=context.log.warning
    )
    context.log.info(f"release at {release.path}; hub: {outcome.metadata()['hub_upload']}")
    return dg.MaterializeResult(
        metadata={
            "release_dir": dg.MetadataValue.path(str(release.path)),
            "files": table_preview(release_files(release.path), max_rows=100),
            "source_step": release.manifest["source"]["step"],
            **outcome.metadata(),
            **checks,
            "model_card": dg.MetadataValue.md(release.card),
        }
    )
