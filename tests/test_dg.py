"""The `dg` CLI (issue 13, item 6): `dg check defs` and `dg list defs` from the repo root, through the
[tool.dg] project configuration in pyproject.toml. Loads the definitions only; nothing is materialized."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DG = Path(sys.executable).with_name("dg.exe" if os.name == "nt" else "dg")

pytestmark = pytest.mark.skipif(
    not DG.is_file(), reason=f"dg executable not found next to {sys.executable} (pip install -e '.[test]')"
)


def _dg(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {k: v for k, v in os.environ.items() if k != "BITMAR_CONFIG"}  # the default (sample) profile
    env.update(DAGSTER_HOME=str(home), OMP_WAIT_POLICY="PASSIVE", NO_COLOR="1", COLUMNS="200")
    return subprocess.run([str(DG), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_dg_check_defs(tmp_path: Path) -> None:
    result = _dg("check", "defs", tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All definitions loaded successfully" in result.stdout + result.stderr


def test_dg_list_defs(tmp_path: Path) -> None:
    result = _dg("list", "defs", "--json", tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    listed = json.loads(result.stdout)
    assets = {a["asset_key"] for a in listed["assets"]}
    assert {"coco_raw", "vision_features", "reasoning_sft", "evaluation_report", "hub_release"} <= assets
    assert {"full_pipeline", "retrain"} <= {j["name"] for j in listed["jobs"]}
    assert "retrain_schedule" in {s["name"] for s in listed["schedules"]}
    assert any(c["key"].startswith("vision_features:") for c in listed["asset_checks"]), listed["asset_checks"]
