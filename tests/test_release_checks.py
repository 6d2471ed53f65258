"""Failed evaluation thresholds block a publishing hub_release: in the same run (Dagster blocking
checks) and in a later run (hub_release reads the recorded outcomes); huggingface_hub.require_passing_checks
false, or a local-only release, turns them into warnings, and the release metadata lists the checks either way."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

import assets.evaluation
from assets.evaluation import CHECKS, CHECKS_FILE, evaluation_report
from assets.release import hub_release, quantization_report
from bitmar_pipeline.evaluation.report import EvaluationResult, ThresholdCheck
from bitmar_pipeline.resources.hub import HuggingFaceHubResource
from bitmar_pipeline.resources.settings import VisionEncoderResource
from bitmar_pipeline.resources.tracking import WandbResource
from tests.factories import make_storage, settings_for

NAMES = [spec.name for spec in CHECKS]


@pytest.fixture
def failing_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluation_report measures a model whose test top-1 (0.3) misses its 0.7 bar."""
    monkeypatch.setattr(
        assets.evaluation, "build_evaluation_report", lambda config, storage, fingerprint, path: EvaluationResult({})
    )
    monkeypatch.setattr(assets.evaluation, "summary_metrics", lambda report: {})
    monkeypatch.setattr(assets.evaluation, "_report_metadata", lambda *args, **kwargs: {})
    monkeypatch.setattr(
        assets.evaluation,
        "threshold_checks",
        lambda report, thresholds: [ThresholdCheck(n, 0.3 if n == "test_head_top1" else 0.9, 0.7) for n in NAMES],
    )


def _resources(storage, **overrides) -> dict:
    """Resources of a release that would be uploaded (the case the checks protect); no upload is reached."""
    return {
        "settings": settings_for(storage, **{"wandb.mode": "disabled", "huggingface_hub.enabled": True, **overrides}),
        "vision_encoder": VisionEncoderResource(),
        "wandb": WandbResource(),
        "hub": HuggingFaceHubResource(),
    }


def test_every_threshold_check_is_blocking():
    assert NAMES and all(spec.blocking for spec in CHECKS)


def test_a_failed_check_blocks_hub_release_in_the_same_run(tmp_path: Path, failing_evaluation) -> None:
    storage = make_storage(tmp_path)
    result = dg.materialize(
        [evaluation_report, hub_release],
        resources=_resources(storage),
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    failed = [c for c in result.get_asset_check_evaluations() if not c.passed]
    assert [(c.check_name, c.severity) for c in failed] == [("test_head_top1", dg.AssetCheckSeverity.ERROR)]
    assert result.asset_materializations_for_node("hub_release") == []
    assert not storage.path("release").exists()
    recorded = json.loads(storage.path("reports", CHECKS_FILE).read_text())["checks"]
    assert [c["name"] for c in recorded if not c["passed"]] == ["test_head_top1"]

    # hub_release alone, in a later run, refuses the same model and says why.
    later = dg.materialize(
        [hub_release], resources=_resources(storage), instance=dg.DagsterInstance.ephemeral(), raise_on_error=False
    )
    assert not later.success
    failure = next(e for e in later.all_events if e.is_step_failure).step_failure_data.error
    assert "evaluation checks failed: test_head_top1 0.3 (needs >= 0.7)" in failure.message
    assert not storage.path("release").exists()


def _released_with_a_warning(tmp_path: Path, **overrides) -> dg.AssetMaterialization:
    """Run evaluation + release on the failing model; the failed check is a warning, the release is
    built and lists it. Returns hub_release's materialization."""
    storage = make_storage(tmp_path)
    result = dg.materialize(
        [quantization_report, evaluation_report, hub_release],
        resources=_resources(storage, **overrides),
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    failed = [c for c in result.get_asset_check_evaluations() if not c.passed]
    assert [(c.check_name, c.severity) for c in failed] == [("test_head_top1", dg.AssetCheckSeverity.WARN)]
    (release,) = result.asset_materializations_for_node("hub_release")
    assert release.metadata["evaluation_checks_failed"].value == ["test_head_top1"]
    assert storage.path("release", "README.md").is_file()
    return release


def test_checks_as_warnings_release_anyway_and_say_which_passed(tmp_path: Path, failing_evaluation) -> None:
    release = _released_with_a_warning(tmp_path, **{"huggingface_hub.require_passing_checks": False})
    assert release.metadata["evaluation_checks_passed"].value == [n for n in NAMES if n != "test_head_top1"]


def test_release_without_recorded_checks_is_refused_by_default(tmp_path: Path) -> None:
    storage = make_storage(tmp_path)
    storage.path("reports", CHECKS_FILE).unlink()
    result = dg.materialize(
        [hub_release], resources=_resources(storage), instance=dg.DagsterInstance.ephemeral(), raise_on_error=False
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error
    assert "materialize evaluation_report first" in failure.message


def test_a_local_only_release_is_built_despite_a_failed_check_and_lists_it(tmp_path: Path, failing_evaluation) -> None:
    _released_with_a_warning(tmp_path, **{"huggingface_hub.enabled": False})
