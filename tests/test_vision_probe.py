"""The offline `tiny-random` encoder's stored features carry each sample object's colour and
shape: a logistic-regression probe reads both (issue 10 item 11)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bitmar_pipeline.config import PipelineConfig
from bitmar_pipeline.features.probe import cell_weights, probe_sample_encoder
from bitmar_pipeline.features.vision_encoder import TINY_RANDOM, Preprocessing, VisionEncoder, resolve_model_source

PROBE_IMAGES = 400


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    root = tmp_path_factory.mktemp("probe")
    grid = PipelineConfig().vision.patch_grid  # the sample profile's grid
    encoder = VisionEncoder(TINY_RANDOM, resolve_model_source(TINY_RANDOM, root / "models"), None, grid, device="cpu")
    return probe_sample_encoder(encoder, root / "coco", PROBE_IMAGES)


def test_probe_reads_object_colour_from_stored_features(probe: dict[str, float]) -> None:
    assert probe["color_accuracy"] >= 0.8, probe
    assert probe["color_majority"] < 0.2


def test_probe_reads_object_shape_from_stored_features(probe: dict[str, float]) -> None:
    assert probe["shape_accuracy"] >= 0.8, probe
    assert probe["shape_majority"] < 0.3


def test_cell_weights_follow_resize_and_centre_crop() -> None:
    # 96 px image resized to 128 and centre-cropped to 112: 8 px cut on each side, 56 px cells.
    preprocessing = Preprocessing(128, 112, 112, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 3, 1 / 255)
    weights = cell_weights(preprocessing, 2, (0.0, 0.0, 48.0, 48.0), (96, 96)).reshape(2, 2)
    assert weights[0, 0] == pytest.approx(1.0)
    straddling = cell_weights(preprocessing, 2, (24.0, 0.0, 72.0, 48.0), (96, 96)).reshape(2, 2)
    np.testing.assert_allclose(straddling, [[0.5, 0.5], [0.0, 0.0]])


def test_tiny_random_model_directory_is_deterministic(tmp_path: Path) -> None:
    first = VisionEncoder(TINY_RANDOM, resolve_model_source(TINY_RANDOM, tmp_path / "a"), None, 3, device="cpu")
    second = VisionEncoder(TINY_RANDOM, resolve_model_source(TINY_RANDOM, tmp_path / "b"), None, 3, device="cpu")
    assert first.fingerprint != second.fingerprint  # the path is part of it...
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert (a == b).all(), name  # ...but the weights are identical
