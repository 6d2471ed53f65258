"""Robot-selection baselines (toy and real public robot data) and the report figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bitmar_model.metrics import MetricWithCI
from bitmar_model.robots import ROBOT_INDEX
from bitmar_pipeline.data.robot_tasks import ingest_robot_datasets
from bitmar_pipeline.evaluation.baselines import MajorityBaseline, TfidfLogisticBaseline, evaluate_selection
from bitmar_pipeline.evaluation.figures import (
    attention_map_figure,
    confusion_figure,
    curve_figure,
    memory_usage_heatmap,
    reliability_diagram,
    weight_distribution_figure,
)

TEXTS = [
    "fly over the field and film it",
    "inspect the roof from the air",
    "fly to the tower",
    "explore the reef under water",
    "inspect the underwater pipe",
    "climb the rocky hill and fly a survey",
]
GOLD = [
    {"Drone"},
    {"Drone"},
    {"Drone"},
    {"Underwater Robot"},
    {"Underwater Robot"},
    {"Drone", "Robot with Legs"},
]


def test_majority_baseline() -> None:
    model = MajorityBaseline().fit(TEXTS, GOLD)
    pred = model.predict(["anything", "else"])
    assert pred.shape == (2, 6) and pred[:, ROBOT_INDEX["Drone"]].all() and pred.sum() == 2
    probs = model.predict_proba(["x"])
    assert probs[0, ROBOT_INDEX["Drone"]] == pytest.approx(4 / 6)
    assert probs[0].argmax() == ROBOT_INDEX["Drone"]


def test_majority_baseline_tie_is_order_free() -> None:
    gold = [{"Humanoid"}, {"Drone"}]
    a = MajorityBaseline().fit(["a", "b"], gold).predict(["q"])
    b = MajorityBaseline().fit(["b", "a"], gold[::-1]).predict(["q"])
    assert (a == b).all() and a[0, ROBOT_INDEX["Drone"]] == 1


def test_tfidf_baseline_learns_deterministic_and_never_empty() -> None:
    model = TfidfLogisticBaseline().fit(TEXTS, GOLD)
    probs = model.predict_proba(["explore the reef", "fly over the tower"])
    assert probs.shape == (2, 6)
    assert probs[0].argmax() == ROBOT_INDEX["Underwater Robot"]
    assert probs[1].argmax() == ROBOT_INDEX["Drone"]
    assert (probs[:, ROBOT_INDEX["No Robot"]] == 0).all()  # constant class: never seen
    again = (
        TfidfLogisticBaseline()
        .fit(TEXTS, GOLD)
        .predict_proba(["explore the reef", "fly over the tower"])
    )
    np.testing.assert_array_equal(probs, again)
    strict = TfidfLogisticBaseline(threshold=1.01).fit(TEXTS, GOLD)
    assert (strict.predict(["completely unrelated words"]).sum(axis=1) == 1).all()


def test_tfidf_baseline_never_selects_no_robot_with_robots(monkeypatch: pytest.MonkeyPatch) -> None:
    model = TfidfLogisticBaseline().fit(TEXTS, GOLD)
    # Columns: Drone, Underwater Robot, Humanoid, Robot with Wheels, Robot with Legs, No Robot.
    probs = np.array([[0.9, 0.2, 0.1, 0.1, 0.1, 0.7], [0.6, 0.55, 0.1, 0.1, 0.1, 0.8]])
    monkeypatch.setattr(model, "predict_proba", lambda texts: probs)
    assert model.predict(["a", "b"]).tolist() == [[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]]


def test_predict_before_fit_fails() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        TfidfLogisticBaseline().predict(["x"])


def test_baselines_on_real_robot_data(robot_data: Path) -> None:
    tasks = ingest_robot_datasets(robot_data / "single_robot_selection.json", None).tasks
    train, test = tasks[tasks.split == "train"], tasks[tasks.split == "test"]
    assert len(train) > 100 and len(test) > 20
    results = {}
    for cls in (MajorityBaseline, TfidfLogisticBaseline):
        model = cls().fit(train.task_text.tolist(), train.robots.tolist())
        texts = test.task_text.tolist()
        results[cls.__name__] = evaluate_selection(
            model.predict_proba(texts), model.predict(texts), test.robots.tolist()
        )
    for result in results.values():
        for key in ("top1", "exact_set", "sample_f1"):
            metric = result[key]
            assert isinstance(metric, MetricWithCI) and metric.n == len(test)
            assert 0.0 <= metric.low <= metric.value <= metric.high <= 1.0
        assert set(result["per_class"]["Drone"]) == {"precision", "recall", "f1", "support"}
    majority, tfidf = results["MajorityBaseline"], results["TfidfLogisticBaseline"]
    assert tfidf["top1"].value >= majority["top1"].value - 0.05
    assert tfidf["sample_f1"].value >= majority["sample_f1"].value - 0.05


# --- figures -------------------------------------------------------------------------------


def _assert_png(path: Path, min_side: int = 150) -> None:
    assert path.is_file() and path.stat().st_size > 5_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) >= min_side
        image.verify()


def test_figures_write_valid_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gold = [{"Drone"}, {"Drone", "Robot with Legs"}, {"Underwater Robot"}, {"Humanoid"}]
    pred = np.array(
        [[1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]]
    )
    conf = rng.random(200)
    written = [
        confusion_figure(pred, gold, tmp_path / "confusion.png"),
        reliability_diagram(conf, rng.random(200) < conf, tmp_path / "reliability.png"),
        memory_usage_heatmap(rng.random((20, 32)), tmp_path / "memory_steps.png"),
        memory_usage_heatmap(rng.random(32), tmp_path / "memory_row.png"),
        attention_map_figure(
            rng.dirichlet(np.ones(8), size=5),
            [f"k{i}" for i in range(8)],
            [f"q{i}" for i in range(5)],
            "attn",
            tmp_path / "attention.png",
        ),
        weight_distribution_figure(
            {"encoder.0.q": (0.34, 0.33, 0.33), "decoder.1.ffn": (0.5, 0.26, 0.24)},
            tmp_path / "weights.png",
        ),
        curve_figure(
            {
                "train": [(s, 1 / (s + 1)) for s in range(100)],
                "val": [(s, 1.2 / (s + 1)) for s in range(0, 100, 10)],
            },
            "loss",
            tmp_path / "nested" / "curves.png",
        ),
    ]
    for path in written:
        _assert_png(path)
    assert not list(tmp_path.glob(".*.tmp"))  # temporary names are renamed away


def test_attention_map_rejects_mismatched_labels(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="labels"):
        attention_map_figure(np.ones((2, 3)), ["a", "b"], ["x", "y"], "bad", tmp_path / "bad.png")
