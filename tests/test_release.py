"""hub_release: the release folder, its model card, and the Hub upload (skip, calls, retries,
token hygiene), without network. The storage layout and the release come from tests/factories.py
(`released` is conftest's session-wide release)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml
from safetensors.torch import save_file

from assets.release import hub_release, quantization_report
from bitmar_model.bitlinear import bitlinear_stats
from bitmar_model.io import TMP_PREFIX, sha256_file
from bitmar_pipeline.config import HubConfig
from bitmar_pipeline.release.folder import (
    MANIFEST_FILE,
    ReleaseError,
    build_release,
    read_report,
)
from bitmar_pipeline.resources.hub import HubUploadError, HuggingFaceHubResource, commit_message
from bitmar_pipeline.storage import Storage
from bitmar_pipeline.training.stages import GRPO, load_stage_model
from tests.factories import (
    EVALUATION,
    PATCH_GRID,
    STEP,
    RecordingApi,
    make_storage,
    settings_for,
    vision_spec,
)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> type[RecordingApi]:
    RecordingApi.instances, RecordingApi.failures, RecordingApi.sleeps = [], [], []
    # No token stored by `hf auth login` on this machine leaks into a test: the store is a fresh path.
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr("bitmar_pipeline.resources.hub.HfApi", RecordingApi)
    monkeypatch.setattr("bitmar_pipeline.resources.hub.time.sleep", RecordingApi.sleeps.append)
    return RecordingApi


def test_release_folder_contents_and_card(released: Storage) -> None:
    release = released.path("release")
    manifest = json.loads((release / MANIFEST_FILE).read_text())
    for name in (
        "config.json",
        "model.safetensors",
        "model.packed.safetensors",
        "packed_config.json",
        "memory.safetensors",
        "evaluation.json",
        "quantization.json",
        "README.md",
        "tokenizer/tokenizer.json",
        "vision_encoder/config.json",
    ):
        assert (release / name).is_file(), name
        assert manifest["files"][name] == sha256_file(release / name)
    assert manifest["vision"] == {
        "model": "tiny-random",
        "revision": None,
        "patch_grid": PATCH_GRID,
        "path": "vision_encoder",
    }
    assert manifest["source"] == {"stage": GRPO, "step": STEP, "fingerprint": "0123456789abcdef"}
    assert json.loads((release / "evaluation.json").read_text()) == EVALUATION
    assert not [
        p for p in released.root.iterdir() if p.name.startswith((".release", TMP_PREFIX))
    ]  # no staging left behind

    card = (release / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "mit" and front["library_name"] == "bitmar" and "bitnet" in front["tags"]
    for section in (
        "## Metrics and baselines",
        "## Training data",
        "## Emissions",
        "## Intended use",
        "## Limitations",
        "## How to load",
    ):
        assert section in card
    assert "| metric | majority | tfidf_logreg | bitmar_head |" in card
    assert "| top1 | 0.330 [0.000, 1.000] | 0.500 [0.000, 1.000] | 0.670 [0.000, 1.000] |" in card
    assert "reasoning.test.stated_confidence_ece | 0.31" in card
    assert "multimodal_pretrain" in card and "grpo_policy" in card  # emissions per stage
    assert "train 2, validation 1, test 3" in card
    assert 'load_predictor("bitmar/bitmar-robot-reasoning")' in card


def test_release_needs_the_evaluation_report(tmp_path: Path) -> None:
    storage = make_storage(tmp_path)
    storage.path("reports", "evaluation_report.json").unlink()
    with pytest.raises(ReleaseError, match=r"evaluation_report\.json is missing: materialize evaluation_report"):
        build_release(storage, settings_for(storage).config, vision_spec(storage))
    with pytest.raises(ReleaseError, match="quantization_report"):
        read_report(storage, "quantization_report.json", "quantization_report")


def test_fresh_process_from_pretrained_reproduces_robot_probabilities(released: Storage, tmp_path: Path) -> None:
    source = load_stage_model(released, GRPO).eval()
    ids = torch.randint(3, source.config.vocab_size, (4, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = source(ids).robot_probs
    save_file({"ids": ids, "probs": probs}, str(tmp_path / "expected.safetensors"))
    script = (
        "import sys, torch\n"
        "from safetensors.torch import load_file\n"
        "from bitmar_model import BitMarModel\n"
        "expected = load_file(sys.argv[2])\n"
        "model = BitMarModel.from_pretrained(sys.argv[1]).eval()\n"
        "with torch.no_grad():\n"
        "    probs = model(expected['ids']).robot_probs\n"
        "print('EQUAL' if torch.equal(probs, expected['probs']) else f'DIFF "
        "{(probs - expected[\"probs\"]).abs().max()}')\n"
    )
    # Same thread count as this process: a different split of the matmul reductions changes
    # the last bit, and "exactly" means bit for bit.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run(
        [sys.executable, "-c", script, str(released.path("release")), str(tmp_path / "expected.safetensors")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "EQUAL"


def test_upload_skipped_without_token_or_when_disabled(
    released: Storage, fake_hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub = HuggingFaceHubResource()
    outcome = hub.publish(released.path("release"), HubConfig(enabled=True), STEP)
    assert (
        not outcome.uploaded
        and outcome.metadata()["hub_upload"] == "skipped: no Hugging Face token: set HF_TOKEN or run `hf auth login`"
    )
    monkeypatch.setenv("HF_TOKEN", "hf_token_value")
    outcome = hub.publish(released.path("release"), HubConfig(enabled=False), STEP)
    assert outcome.metadata()["hub_upload"] == "skipped: huggingface_hub.enabled is false"
    assert fake_hub.instances == []


def test_upload_makes_the_expected_calls(released: Storage, fake_hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_token_value")
    config = HubConfig(enabled=True, repo_id="someone/bitmar-test", private=False, commit_message="BitMar step {step}")
    hub = HuggingFaceHubResource(endpoint="http://127.0.0.1:9")
    outcome = hub.publish(released.path("release"), config, STEP)
    (api,) = fake_hub.instances
    assert (api.endpoint, api.token) == ("http://127.0.0.1:9", "hf_token_value")
    assert api.calls == [
        ("create_repo", "someone/bitmar-test", {"private": False, "exist_ok": True}),
        (
            "upload_folder",
            {
                "repo_id": "someone/bitmar-test",
                "folder_path": str(released.path("release")),
                "commit_message": "BitMar step 7",
            },
        ),
    ]
    assert outcome.commit_url == "https://hub.example/someone/bitmar-test/commit/abc123" and outcome.attempts == 1


def test_upload_uses_the_token_stored_by_hf_auth_login(
    released: Storage, fake_hub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No HF_TOKEN in the environment: the token `hf auth login` wrote to HF_TOKEN_PATH is used."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    stored = tmp_path / "hf_home" / "token"
    stored.parent.mkdir()
    stored.write_text("hf_stored_by_login\n")
    outcome = HuggingFaceHubResource().publish(released.path("release"), HubConfig(enabled=True), STEP)
    (api,) = fake_hub.instances
    assert outcome.uploaded and api.token == "hf_stored_by_login"
    assert [call[0] for call in api.calls] == ["create_repo", "upload_folder"]


def test_commit_message_template() -> None:
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert (
        commit_message(HubConfig().commit_message, 12, when)
        == "Upload BitMar model (step 12, 2025-01-02T03:04:05+00:00)"
    )
    with pytest.raises(HubUploadError, match="only {step} and {timestamp}"):
        commit_message("step {epoch}", 1, when)


def test_upload_retries_with_backoff_then_succeeds(
    released: Storage, fake_hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_token_value")
    fake_hub.failures = [ConnectionError("reset by peer"), TimeoutError("read timed out")]
    logged: list[str] = []
    outcome = HuggingFaceHubResource(backoff_seconds=0.5).publish(
        released.path("release"), HubConfig(enabled=True), STEP, log=logged.append
    )
    assert outcome.uploaded and outcome.attempts == 3
    assert fake_hub.sleeps == [0.5, 1.0]
    assert len(logged) == 2 and "reset by peer" in logged[0]


def test_upload_gives_up_after_max_attempts(released: Storage, fake_hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_token_value")
    fake_hub.failures = [ConnectionError("hub unreachable")] * 5
    with pytest.raises(HubUploadError, match=r"failed after 3 attempts; last error: ConnectionError: hub unreachable"):
        HuggingFaceHubResource(max_attempts=3, backoff_seconds=1).publish(
            released.path("release"), HubConfig(enabled=True), STEP
        )
    assert fake_hub.sleeps == [1, 2]
    assert len([c for c in fake_hub.instances[0].calls if c[0] == "upload_folder"]) == 3


def test_upload_does_not_retry_an_auth_error(released: Storage, fake_hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_token_value")
    unauthorized = RuntimeError("401 Unauthorized")
    unauthorized.response = type("Response", (), {"status_code": 401})()
    fake_hub.failures = [unauthorized]
    with pytest.raises(HubUploadError, match="not retried: RuntimeError: 401 Unauthorized"):
        HuggingFaceHubResource().publish(released.path("release"), HubConfig(enabled=True), STEP)
    assert fake_hub.sleeps == []


def test_token_never_leaks(
    released: Storage,
    fake_hub,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture,
) -> None:
    secret = "hf_PLANTEDsecret0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    caplog.set_level(logging.DEBUG)
    leaky = ConnectionError(f"POST https://huggingface.co/api/repos/create failed, Authorization: Bearer {secret}")
    fake_hub.failures = [leaky] * 3

    # A failing upload: the error text and its formatted traceback are clean.
    with pytest.raises(HubUploadError) as raised:
        HuggingFaceHubResource(max_attempts=3).publish(
            released.path("release"), HubConfig(enabled=True), STEP, log=logging.getLogger("bitmar.test").warning
        )
    assert secret not in str(raised.value)
    assert secret not in "".join(traceback.format_exception(raised.value))
    assert "Bearer ***" in str(raised.value)

    # A materialization that retries once and uploads: metadata, card, events and logs are clean.
    fake_hub.failures = [leaky]
    result = dg.materialize(
        [hub_release],
        resources={
            "settings": settings_for(released, **{"huggingface_hub.enabled": True}),
            "hub": HuggingFaceHubResource(),
        },
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    (materialization,) = result.asset_materializations_for_node("hub_release")
    assert materialization.metadata["hub_upload"].value == "uploaded"
    assert materialization.metadata["hub_commit_url"].value.endswith("/commit/abc123")
    texts = [str(m.value) for m in materialization.metadata.values()]
    texts += [str(e.message) for e in result.all_events]
    texts += [r.getMessage() for r in caplog.records]
    texts += [p.read_text(errors="ignore") for p in released.path("release").rglob("*") if p.suffix in {".md", ".json"}]
    out, err = capfd.readouterr()
    assert all(secret not in t for t in [*texts, out, err])
    assert any("retrying in" in t and "Bearer ***" in t for t in texts)


def test_assets_materialize_skipped_upload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    storage = make_storage(tmp_path)
    result = dg.materialize(
        [quantization_report, hub_release],
        resources={"settings": settings_for(storage), "hub": HuggingFaceHubResource()},
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    quant = result.asset_materializations_for_node("quantization_report")[0].metadata
    layers = len(bitlinear_stats(load_stage_model(storage, GRPO)))
    assert quant["bitlinear_layers"].value == layers and "weight_distribution_figure" in quant
    assert {"fake_quant", "dense_fp32"} <= {r.data["model"] for r in quant["latency"].value.records}
    release = result.asset_materializations_for_node("hub_release")[0].metadata
    assert release["hub_upload"].value == "skipped: huggingface_hub.enabled is false"
    assert release["source_step"].value == STEP
    assert storage.path("release", MANIFEST_FILE).is_file()
