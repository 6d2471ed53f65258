"""Labelled non-robot tasks: what the knowledge's no-robot gate learns "No Robot" from.

The public robot selection data labels every task with robots, so nothing trained on it can say
"No Robot". `no_robot_tasks.json` holds 100 tasks written for this project that no robot of a
fleet should do ("Draft a cover letter", "Reconcile last month's bank statement"); a user's own
file (`training.knowledge_no_robot_tasks: <path>`) has the same form: {"tasks": ["...", ...]}.
"""

from __future__ import annotations

import json
from pathlib import Path

from bitmar_pipeline.data.robot_tasks import normalize_task_text

BUNDLED_NO_ROBOT_TASKS = Path(__file__).resolve().parent / "no_robot_tasks.json"
BUNDLED = "bundled"


def load_no_robot_tasks(source: str | Path) -> list[str]:
    """The task texts of a no-robot task file ("bundled": the committed one); ValueError naming the
    file and the entry on anything but a non-empty list of distinct, non-empty strings."""
    path, tasks = read_task_list(source, BUNDLED_NO_ROBOT_TASKS, "training.knowledge_no_robot_tasks")
    for index, task in enumerate(tasks):
        if not isinstance(task, str) or not task.strip():
            raise ValueError(f"{path}: tasks[{index}] must be a non-empty string, got {task!r}")
    refuse_repeats(path, tasks)
    return [t.strip() for t in tasks]


def read_task_list(source: str | Path, bundled: Path, setting: str) -> tuple[Path, list]:
    """(path, its 'tasks' list) of a written task file ("bundled": `bundled`); ValueError naming the
    setting when the file is missing, the file when it is no JSON object with a non-empty 'tasks' list."""
    path = bundled if str(source) == BUNDLED else Path(source)
    if not path.is_file():
        raise ValueError(f"{setting}: {path} is not a file")
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))["tasks"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: expected a JSON object with a 'tasks' list ({error!r})") from error
    if not isinstance(tasks, list) or not tasks:
        raise ValueError(f"{path}: 'tasks' must be a non-empty list of tasks")
    return path, tasks


def refuse_repeats(path: Path, texts: list[str]) -> None:
    """ValueError naming the file and both entries when two texts are the same task (normalised)."""
    seen: dict[str, int] = {}
    for index, text in enumerate(texts):
        key = normalize_task_text(text)
        if key in seen:
            raise ValueError(f"{path}: tasks[{index}] {text!r} repeats tasks[{seen[key]}]")
        seen[key] = index
