"""The labelled non-robot tasks the no-robot gate trains on: the bundled file, a user's own, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitmar_pipeline.config import TrainingConfig
from bitmar_pipeline.data.no_robot import BUNDLED_NO_ROBOT_TASKS, load_no_robot_tasks
from bitmar_pipeline.data.robot_tasks import normalize_task_text
from bitmar_pipeline.evaluation.robustness import USER_PHRASED_FILE, USER_PHRASED_VALIDATION_FILE, load_eval_set


def test_the_bundled_tasks_load_and_share_none_with_an_evaluation_set() -> None:
    """Training data must not hold an evaluated task: none of the 100 is (normalised) a task of the
    user-phrased test or validation set or of the README examples."""
    tasks = load_no_robot_tasks("bundled")
    assert len(tasks) == 100 and tasks == load_no_robot_tasks(BUNDLED_NO_ROBOT_TASKS)
    readme = json.loads((USER_PHRASED_FILE.parent / "readme_examples.json").read_text())
    evaluated = [t.task for f in (USER_PHRASED_FILE, USER_PHRASED_VALIDATION_FILE) for t in load_eval_set(f)]
    evaluated += [row["task"] for row in readme["tasks"]]
    assert not {normalize_task_text(t) for t in tasks} & {normalize_task_text(t) for t in evaluated}


def test_a_users_own_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"tasks": ["Answer my email ", "Plan a party"]}))
    assert load_no_robot_tasks(str(path)) == ["Answer my email", "Plan a party"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "expected a JSON object with a 'tasks' list"),
        ('{"task": []}', "expected a JSON object with a 'tasks' list"),
        ('{"tasks": []}', "'tasks' must be a non-empty list"),
        ('{"tasks": ["Plan a party", " "]}', r"tasks\[1\] must be a non-empty string"),
        ('{"tasks": ["Plan a party", 3]}', r"tasks\[1\] must be a non-empty string"),
        ('{"tasks": ["Plan a party", "plan a  party."]}', r"tasks\[1\] 'plan a  party.' repeats tasks\[0\]"),
    ],
)
def test_a_bad_file_is_refused_naming_it(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as caught:
        load_no_robot_tasks(path)
    assert str(path) in str(caught.value)


def test_a_missing_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"training.knowledge_no_robot_tasks: .*absent.json is not a file"):
        load_no_robot_tasks(tmp_path / "absent.json")


def test_an_empty_setting_turns_the_gate_off() -> None:
    assert TrainingConfig(knowledge_no_robot_tasks="").knowledge_no_robot_tasks is None
    assert TrainingConfig().knowledge_no_robot_tasks == "bundled"
    with pytest.raises(ValueError, match="knowledge_no_robot_thresholds"):
        TrainingConfig(knowledge_no_robot_thresholds=[0.5])
