"""Robot selection ingestion on the real public files, on hand-made bad files, and on the sample."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from bitmar_model.robots import ROBOT_CLASSES
from bitmar_pipeline.data.robot_sample import ROBOT_SELECTION_INSTRUCTION, generate_sample_robot_datasets
from bitmar_pipeline.data.robot_tasks import (
    SPLITS,
    RobotDataFileError,
    assign_split,
    ingest_robot_datasets,
    load_robot_records,
    normalize_task_text,
    parse_instruction_capabilities,
)

SINGLE = "single_robot_selection.json"
MULTI = "multi_robot_selection_dataset.json"
TASK = "Task: Inspect a high-rise building’s exterior for damage."


@pytest.fixture(scope="module")
def real(robot_data: Path):
    return ingest_robot_datasets(robot_data / SINGLE, robot_data / MULTI)


def _by_kind(frame, kind: str):
    return frame[frame["source"].str.startswith(f"{kind}:")]


# --- real data -------------------------------------------------------------------------


def test_real_rows_are_all_accounted_for(real):
    assert real.input_rows == {f"single:{SINGLE}": 250, f"multi:{MULTI}": 250}
    for source, rows in real.input_rows.items():
        kept = (real.tasks["source"] == source).sum()
        quarantined = (real.quarantine["source"] == source).sum()
        assert kept + quarantined == rows
    # The public files repeat six tasks verbatim; nothing else is wrong with them.
    assert real.quarantine.groupby("source")["reason"].value_counts().to_dict() == {
        (f"multi:{MULTI}", "duplicate"): 6,
        (f"single:{SINGLE}", "duplicate"): 6,
    }
    assert real.tasks["task_id"].is_unique
    assert len(real.subtasks) == 4 * len(_by_kind(real.tasks, "multi"))


def test_real_files_share_tasks_after_normalisation(real):
    single, multi = _by_kind(real.tasks, "single"), _by_kind(real.tasks, "multi")
    # One raw text differs ("building’s" vs "buildings"); the key must still match all of them.
    assert set(single["task_key"]) == set(multi["task_key"])
    assert len(single) == 244
    merged = single.merge(multi, on="task_key")
    assert (merged["robots_x"].map(tuple) == merged["robots_y"].map(tuple)).all()


def test_real_splits_do_not_leak_and_are_roughly_70_15_15(real):
    assert real.tasks.groupby("task_key")["split"].nunique().max() == 1
    subtask_splits = real.subtasks.merge(real.tasks[["task_id", "split"]], on="task_id")
    assert (subtask_splits["split_x"] == subtask_splits["split_y"]).all()
    shares = real.tasks.drop_duplicates("task_key")["split"].value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.70, abs=0.06)
    assert shares["validation"] == pytest.approx(0.15, abs=0.05)
    assert shares["test"] == pytest.approx(0.15, abs=0.05)


def test_real_robots_are_canonical_and_ordered(real):
    for robots in real.tasks["robots"]:
        assert robots and set(robots) <= set(ROBOT_CLASSES)
        assert robots == sorted(robots, key=ROBOT_CLASSES.index)
    assert set(real.subtasks["robot"]) <= set(ROBOT_CLASSES)
    assert real.subtasks["execution_order"].min() >= 1


def test_real_instruction_parses_to_five_robot_profiles(real):
    assert real.tasks["instruction"].nunique() == 1
    instruction = real.tasks["instruction"].iloc[0]
    assert instruction == ROBOT_SELECTION_INSTRUCTION
    profiles = parse_instruction_capabilities(instruction)
    assert set(profiles) == set(ROBOT_CLASSES) - {"No Robot"}
    assert profiles["Underwater Robot"]["environments"][0] == "underwater"
    assert profiles["Drone"]["limitations"] == [
        "limited payload",
        "loud",
        "weather dependent",
        "battery life",
    ]
    assert all(all(profile[field] for field in profile) for profile in profiles.values())


# --- normalisation and splitting -----------------------------------------------------


def test_normalize_task_text():
    assert normalize_task_text(TASK) == normalize_task_text(
        "Task: Inspect a high-rise buildings exterior for damage"
    )
    assert normalize_task_text("  TASK:  Ｓurvey the “old” pier!! ") == "survey the old pier"
    assert normalize_task_text("Task: ...") == ""


def test_assign_split_is_deterministic_and_validated():
    keys = [f"task {i}" for i in range(2000)]
    splits = [assign_split(k) for k in keys]
    assert splits == [assign_split(k) for k in keys]
    assert set(splits) == set(SPLITS)
    assert splits.count("train") / len(keys) == pytest.approx(0.7, abs=0.04)
    assert {assign_split(k, (1.0, 0.0, 0.0)) for k in keys[:50]} == {"train"}
    assert [assign_split(k, seed="other") for k in keys] != splits
    with pytest.raises(ValueError, match="fractions"):
        assign_split("x", (0.5, 0.5, 0.5))


def test_parse_instruction_rejects_unknown_robot():
    with pytest.raises(ValueError, match="Submarine"):
        parse_instruction_capabilities("Submarine:\ncapabilities: diving,\n")


# --- bad files -----------------------------------------------------------------------


def _single(task: str = TASK, output: str = "Drone", **extra) -> dict:
    return {"instruction": ROBOT_SELECTION_INSTRUCTION, "input": task, "output": output, **extra}


def _multi(task: str = TASK, robots="Drone", subtasks=None) -> dict:
    if subtasks is None:
        subtasks = [
            {"subtask": "Fly around the roof", "assigned_robot": "drone", "execution_order": 1}
        ]
    return {
        "instruction": ROBOT_SELECTION_INSTRUCTION,
        "input": task,
        "subtasks": subtasks,
        "original_single_robot_output": robots,
    }


def _write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def test_malformed_json_names_file_and_line(tmp_path: Path):
    path = tmp_path / "single.json"
    path.write_text('[\n  {"input": "Task: a",\n   "output": "Drone"\n  ,]\n', encoding="utf-8")
    with pytest.raises(RobotDataFileError, match=r"single\.json: line 4, column \d+"):
        load_robot_records(path, "single")
    path.write_text('\n  {"rows": []}', encoding="utf-8")
    with pytest.raises(
        RobotDataFileError, match=r"single\.json: line 2, column 3: expected a JSON array"
    ):
        load_robot_records(path, "single")


def test_wrong_kind_and_extension_are_file_errors(tmp_path: Path):
    multi = _write_json(tmp_path / "multi.json", [_multi()])
    with pytest.raises(RobotDataFileError, match="multi-robot fields"):
        load_robot_records(multi, "single")
    other = tmp_path / "tasks.txt"
    other.write_text("x", encoding="utf-8")
    with pytest.raises(RobotDataFileError, match=r"tasks\.txt"):
        load_robot_records(other, "single")


def test_bad_rows_are_quarantined_with_reasons(tmp_path: Path):
    records = [
        _single(),
        _single(output="Submarine"),
        _single(task="Task: Dive to the wreck", output="Underwater robot, Submarine"),
        {"instruction": ROBOT_SELECTION_INSTRUCTION, "input": "Task: Patrol the road"},
        _single(task="Task:   "),
        _single(task="Task: Sweep the warehouse", output=" , "),
        "not an object",
        _single(
            task="Task: inspect a high-rise buildings exterior for damage!"
        ),  # same task, same robot
        _single(task="Task: Climb the stairs", output="Robot with Legs"),
        _single(task="Task: climb the stairs.", output="Humanoid"),
        _single(task="Task: Fix the shelf with tools", output="Humanoid and Robot with Legs"),
    ]
    result = ingest_robot_datasets(_write_json(tmp_path / "s.json", records), None)
    reasons = dict(zip(result.quarantine["key"], result.quarantine["reason"], strict=True))
    assert reasons == {
        "[1]": "unknown_robot",
        "[2]": "unknown_robot",
        "[3]": "missing_field",
        "[4]": "empty_task",
        "[5]": "empty_output",
        "[6]": "malformed_row",
        "[7]": "duplicate",
        "[8]": "conflicting_duplicate",
        "[9]": "conflicting_duplicate",
    }
    assert "Submarine" in result.quarantine.set_index("key").loc["[1]", "detail"]
    assert len(result.tasks) + len(result.quarantine) == len(records)
    assert result.tasks["robots"].tolist() == [["Drone"], ["Humanoid", "Robot with Legs"]]
    assert (
        result.tasks["task_text"].iloc[0] == "Inspect a high-rise building’s exterior for damage."
    )


def test_multi_rows_validate_subtasks(tmp_path: Path):
    def step(robot="Drone", order=1, text="Do it"):
        return {"subtask": text, "assigned_robot": robot, "execution_order": order}

    records = [
        _multi(robots=["Drone", "robot with legs"], subtasks=[step(), step("Legged", 2)]),
        _multi(task="Task: a", subtasks=[]),
        _multi(task="Task: b", subtasks=[step("Submarine")]),
        _multi(task="Task: c", subtasks=[step(order=True)]),
        _multi(task="Task: d", subtasks=[step(text=" ")]),
        _multi(task="Task: e", subtasks=[{"subtask": "x"}]),
    ]
    result = ingest_robot_datasets(
        None, _write_json(tmp_path / "m.json", records), source_name="hand"
    )
    assert result.quarantine["reason"].tolist() == [
        "malformed_subtasks",
        "unknown_robot",
        "malformed_subtasks",
        "malformed_subtasks",
        "malformed_subtasks",
    ]
    assert result.tasks["source"].tolist() == ["multi:hand"]
    assert result.tasks["robots"].iloc[0] == ["Drone", "Robot with Legs"]
    assert result.subtasks[["subtask_index", "robot", "execution_order"]].values.tolist() == [
        [0, "Drone", 1],
        [1, "Robot with Legs", 2],
    ]


def test_csv_files(tmp_path: Path):
    single = tmp_path / "single.csv"
    with single.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["instruction", "input", "output"])
        writer.writerow(["multi\nline instruction", TASK, "Drone, Robot with Legs"])
        writer.writerow(["i", "Task: Swim", "Submarine"])
        writer.writerow(["i", "Task: Walk", "Humanoid", "surplus cell"])
    multi = tmp_path / "multi.csv"
    with multi.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["instruction", "input", "subtasks", "original_single_robot_output"])
        steps = [{"subtask": "Fly", "assigned_robot": "Drone", "execution_order": 1}]
        writer.writerow(["i", TASK, json.dumps(steps), '["Drone", "Robot with Legs"]'])
        writer.writerow(["i", "Task: Swim", "{not json", "Underwater Robot"])
    result = ingest_robot_datasets(single, multi)
    assert result.quarantine[["key", "reason"]].values.tolist() == [
        ["line 4", "unknown_robot"],  # the instruction cell of the first row spans two lines
        ["line 5", "malformed_row"],
        ["line 3", "malformed_subtasks"],
    ]
    assert result.tasks["robots"].tolist() == [["Drone", "Robot with Legs"]] * 2
    assert result.tasks["split"].nunique() == 1
    assert len(result.subtasks) == 1

    broken = tmp_path / "broken.csv"
    broken.write_text('instruction,input,output\ni,"Task: unterminated,Drone\n', encoding="utf-8")
    with pytest.raises(RobotDataFileError, match=r"broken\.csv: line \d+: malformed CSV"):
        load_robot_records(broken, "single")
    headless = tmp_path / "headless.csv"
    headless.write_text("instruction,input\ni,Task: x\n", encoding="utf-8")
    with pytest.raises(RobotDataFileError, match=r"headless\.csv: line 1: .*output"):
        load_robot_records(headless, "single")


# --- sample generator ----------------------------------------------------------------

_KEYWORD_ROBOTS = {
    r"underwater": "Underwater Robot",
    r"aerial|roof|high-rise": "Drone",
    r"stairs|rubble": "Robot with Legs",
    r"warehouse|road": "Robot with Wheels",
    r"human interaction|tools": "Humanoid",
}


def test_sample_is_deterministic_and_clean(tmp_path: Path):
    first = generate_sample_robot_datasets(tmp_path / "a", num_tasks=120, seed=3)
    second = generate_sample_robot_datasets(tmp_path / "b", num_tasks=120, seed=3)
    other = generate_sample_robot_datasets(tmp_path / "c", num_tasks=120, seed=4)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert first[0].read_bytes() != other[0].read_bytes()
    result = ingest_robot_datasets(*first, source_name="sample")
    assert result.quarantine.empty
    assert len(result.tasks) == 240
    assert set(result.tasks["split"]) == set(SPLITS)
    for text, robots in zip(result.tasks["task_text"], result.tasks["robots"], strict=True):
        implied = {
            robot
            for pattern, robot in _KEYWORD_ROBOTS.items()
            if re.search(rf"\b({pattern})\b", text)
        }
        assert implied == set(robots), text
    assert (result.tasks["robots"].map(len) > 1).any()
    assert set(result.subtasks["robot"]) == set(ROBOT_CLASSES) - {"No Robot"}
