"""Shared fixtures. Real data lives in ../shared/data beside the checkout; tests that need it
skip with a reason when it is absent (a user's clone)."""

from __future__ import annotations

import os
from pathlib import Path

# Before torch is imported anywhere: see bitmar_pipeline/__init__.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

pytest_plugins = ["tests.http_server"]

SHARED_DATA = Path(os.environ.get("BITMAR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def released(tmp_path_factory: pytest.TempPathFactory):
    """One release (storage layout, quantization report, release folder) for the whole session:
    building it takes seconds. Tests that change files work on a copy."""
    from tests.factories import make_release  # imports torch: only when a test needs it

    return make_release(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    root = SHARED_DATA / "coco-mini"
    if not (root / "annotations" / "captions_train2017.json").is_file():
        pytest.skip(f"real COCO sample not found at {root} (set BITMAR_SHARED_DATA to the shared/data folder)")
    return root


@pytest.fixture(scope="session")
def robot_data() -> Path:
    root = SHARED_DATA / "robot_selection"
    if not (root / "single_robot_selection.json").is_file():
        pytest.skip(f"real robot selection data not found at {root} (set BITMAR_SHARED_DATA to the shared/data folder)")
    return root
