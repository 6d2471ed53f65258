"""Cross-validation folds of the robot tasks (data.robot.cv_fold) on the real public data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from bitmar_pipeline.config import ConfigError, build_config
from bitmar_pipeline.data.robot_sources import load_robot_tables
from bitmar_pipeline.data.robot_tasks import CV_FOLDS, assign_cv_split, cv_fold_of, ingest_robot_datasets
from bitmar_pipeline.storage import Storage

SINGLE = "single_robot_selection.json"
MULTI = "multi_robot_selection_dataset.json"


def _tasks(robot_data: Path, cv_fold: int | None) -> pd.DataFrame:
    return ingest_robot_datasets(robot_data / SINGLE, robot_data / MULTI, cv_fold=cv_fold).tasks


def test_each_task_is_tested_in_exactly_one_fold(robot_data: Path) -> None:
    folds = {k: _tasks(robot_data, k) for k in range(CV_FOLDS)}
    keys = set(folds[0]["task_key"])
    tested = [f.loc[f["split"] == "test", "task_key"].drop_duplicates() for f in folds.values()]
    test_counts = pd.concat(tested).value_counts()
    assert set(test_counts.index) == keys and (test_counts == 1).all()
    # Fold sizes over the 244 unique tasks, as in docs/decisions.md (issue 12 ablation).
    sizes = pd.Series([cv_fold_of(k) for k in keys]).value_counts().sort_index()
    assert sizes.tolist() == [39, 51, 53, 56, 45]
    for k, tasks in folds.items():
        assert tasks.groupby("task_key")["split"].nunique().max() == 1  # single and multi rows agree
        unique = tasks.drop_duplicates("task_key")
        validation = set(unique.loc[unique["split"] == "validation", "task_key"])
        assert validation == {key for key in keys if cv_fold_of(key) == (k + 1) % CV_FOLDS}
        assert set(unique.loc[unique["split"] == "test", "task_key"]) == {key for key in keys if cv_fold_of(key) == k}


def test_default_split_is_unchanged(robot_data: Path) -> None:
    unique = _tasks(robot_data, None).drop_duplicates("task_key")
    assert unique["split"].value_counts().to_dict() == {"train": 173, "validation": 40, "test": 31}
    digest = hashlib.sha256("\n".join(sorted(unique["task_key"] + "=" + unique["split"])).encode()).hexdigest()
    assert digest[:16] == "e371d4a3070733ac"


def test_cv_split_rule() -> None:
    key = "inspect the roof"
    fold = cv_fold_of(key)
    assert fold == int(hashlib.sha256(key.encode()).hexdigest(), 16) % 5
    assert assign_cv_split(key, fold) == "test"
    assert assign_cv_split(key, (fold - 1) % 5) == "validation"
    assert assign_cv_split(key, (fold + 1) % 5) == "train"
    with pytest.raises(ValueError, match="0..4"):
        assign_cv_split(key, 5)


def test_config_option_reaches_the_ingested_tables(robot_data: Path, tmp_path: Path) -> None:
    assert build_config().data.robot.cv_fold is None
    with pytest.raises(ConfigError, match="cv_fold"):
        build_config(overrides={"data.robot.cv_fold": 5})
    config = build_config(
        overrides={
            "data.robot.source": "local",
            "data.robot.single_path": str(robot_data / SINGLE),
            "data.robot.multi_path": str(robot_data / MULTI),
            "data.robot.cv_fold": 2,
        }
    )
    result, _ = load_robot_tables(config, Storage(tmp_path))
    unique = result.tasks.drop_duplicates("task_key")
    assert unique["split"].value_counts().to_dict() == {"train": 135, "validation": 56, "test": 53}
