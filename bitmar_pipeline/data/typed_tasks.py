"""Label-balanced robot tasks typed as people type them: extra rows for the knowledge classifier.

The public data's tasks are long and skewed (22 Humanoid train tasks against 188 Drone ones), so the
classifier learns their wording and their priors. `typed_robot_tasks.json` holds 108 short tasks
written for this project from each robot's capabilities and environments ("Fold laundry", "Tow a
glider along a flat airstrip"), each labelled with its robot, kept only where no evaluation task
and no public task is near (the rule in the file's description); a user's own file
(`training.knowledge_typed_tasks: <path>`) has the same form:
{"tasks": [{"task": "...", "robots": ["Humanoid"]}, ...]}.
"""

from __future__ import annotations

from pathlib import Path

from bitmar_model.reasoning_format import NO_ROBOT
from bitmar_model.robots import normalize_robot_name
from bitmar_pipeline.data.no_robot import read_task_list, refuse_repeats

BUNDLED_TYPED_TASKS = Path(__file__).resolve().parent / "typed_robot_tasks.json"


def load_typed_tasks(source: str | Path) -> tuple[list[str], list[list[str]]]:
    """(task texts, each one's robots) of a typed task file ("bundled": the committed one); ValueError
    naming the file and the entry on a task that is not a non-empty string, robots that are not a
    non-empty list of the model's robot names ("No Robot" belongs in the no-robot tasks), or a repeat."""
    path, rows = read_task_list(source, BUNDLED_TYPED_TASKS, "training.knowledge_typed_tasks")
    texts, robots = [], []
    for index, row in enumerate(rows):
        task = row.get("task") if isinstance(row, dict) else None
        if not isinstance(task, str) or not task.strip():
            raise ValueError(f"{path}: tasks[{index}] must be an object with a non-empty 'task' string, got {row!r}")
        names = row.get("robots")
        canonical = [normalize_robot_name(n) for n in names] if isinstance(names, list) else []
        if not canonical or None in canonical or NO_ROBOT in canonical:
            raise ValueError(
                f"{path}: tasks[{index}] ({task!r}): 'robots' must be a non-empty list of robot names other than "
                f"{NO_ROBOT!r} (those go in training.knowledge_no_robot_tasks), got {names!r}"
            )
        texts.append(task.strip())
        robots.append(list(dict.fromkeys(canonical)))
    refuse_repeats(path, texts)
    return texts, robots
