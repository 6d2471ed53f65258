"""Platt scaling of the head's top-choice probability."""

import numpy as np
import pytest

from bitmar_model.calibration import PlattCalibration
from bitmar_model.metrics import expected_calibration_error


def overconfident(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stated p, right with probability p**3: confidently wrong, like an overfitted head."""
    rng = np.random.default_rng(seed)
    stated = rng.uniform(0.3, 0.999, n)
    return stated, (rng.uniform(size=n) < stated**3).astype(float)


def test_fitted_calibration_lowers_held_out_ece():
    fit_conf, fit_right = overconfident(seed=0)
    test_conf, test_right = overconfident(seed=1)
    calibration = PlattCalibration.fit(fit_conf, fit_right)
    before = expected_calibration_error(test_conf, test_right)
    after = expected_calibration_error(calibration(test_conf), test_right)
    assert before > 0.1 and after < before / 2, (before, after)


def test_calibrated_input_is_left_about_alone():
    rng = np.random.default_rng(2)
    stated = rng.uniform(0.05, 0.95, 4000)
    calibration = PlattCalibration.fit(stated, (rng.uniform(size=4000) < stated).astype(float))
    assert calibration.a == pytest.approx(1.0, abs=0.15) and calibration.b == pytest.approx(0.0, abs=0.15)


def test_fit_does_not_overshoot_when_confidences_sit_near_one():
    # 32 of 40 overconfident tasks: a full Newton step from the identity jumped to a ~ 1600,
    # b ~ 1000 (every held-out task then read 0 or 1) before steps were halved.
    stated, right = overconfident(40, seed=0)
    keep = np.arange(40) % 5 != 1
    calibration = PlattCalibration.fit(stated[keep], right[keep], l2=1e-2)
    assert 0.3 < calibration.a < 3 and -4 < calibration.b < 1, calibration
    assert expected_calibration_error(calibration(stated), right) < expected_calibration_error(stated, right)


def test_all_right_validation_gives_finite_parameters_and_round_trips():
    calibration = PlattCalibration.fit(np.array([0.6, 0.7, 0.9]), np.ones(3))
    assert np.isfinite([calibration.a, calibration.b]).all()
    assert PlattCalibration.from_dict(calibration.to_dict()) == calibration
    assert PlattCalibration()(np.array([0.25]))[0] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="unknown method"):
        PlattCalibration.from_dict({"method": "isotonic"})


def test_report_section_fits_on_validation_and_scores_both_splits():
    from bitmar_pipeline.evaluation.report import calibration_section

    validation = overconfident(400, seed=3)
    section = calibration_section(PlattCalibration.fit(*validation), validation, overconfident(400, seed=4))
    assert section["fitted_on"] == "validation" and section["n"] == 400
    assert PlattCalibration.from_dict(section) == PlattCalibration.fit(*overconfident(400, seed=3))
    assert section["test_ece_after"] < section["test_ece_before"]


def test_cross_validation_pools_the_folds_test_tasks_for_ece():
    """Each report records its test tasks' top-choice confidences; robot_cv pools them across folds
    (and reports nothing for a report that predates the record)."""
    import importlib.util
    from pathlib import Path

    from bitmar_pipeline.evaluation.report import calibration_section

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "robot_cv.py"
    spec = importlib.util.spec_from_file_location("robot_cv", path)
    robot_cv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(robot_cv)
    folds = [overconfident(50, seed=s) for s in (5, 6)]
    calibration = PlattCalibration.fit(*overconfident(400, seed=7))
    reports = [{"calibration": calibration_section(calibration, fold, fold)} for fold in folds]
    pooled = robot_cv.pooled_head_ece(reports)
    confidences, correct = (np.concatenate(parts) for parts in zip(*folds, strict=True))
    assert pooled["n"] == 100
    assert pooled["before"] == pytest.approx(expected_calibration_error(confidences, correct), abs=1e-3)
    assert pooled["after"] == pytest.approx(expected_calibration_error(calibration(confidences), correct), abs=1e-3)
    assert pooled["after"] < pooled["before"]
    assert robot_cv.pooled_head_ece([*reports, {"calibration": {}}]) is None
