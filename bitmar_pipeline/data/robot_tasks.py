"""Robot selection dataset ingestion: read, validate, deduplicate and split the task files.

Two file kinds share one task vocabulary: "single" (task -> robots) and "multi" (task ->
robots plus a subtask plan with an assigned robot per subtask). Every input row ends
either in `tasks` (and, for multi rows, `subtasks`) or in `quarantine` with a reason; a
file that cannot be read as a whole raises `RobotDataFileError` naming file and position.

Duplicate policy (within one file, by normalised task text):
- same robots: the first row is kept, later rows are quarantined as "duplicate";
- different robots: every row of that task is quarantined as "conflicting_duplicate".
  Keeping the first would make the training label depend on row order, and robot
  labels are never guessed.
The split is a hash of the normalised task text, so a task lands in the same split in
both files and near-identical spellings of one task cannot leak across splits.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from bitmar_model.robots import ROBOT_INDEX, normalize_robot_name, split_robot_list

RobotFileKind = Literal["single", "multi"]

SPLITS: tuple[str, ...] = ("train", "validation", "test")
DEFAULT_SPLIT_FRACTIONS: tuple[float, float, float] = (0.7, 0.15, 0.15)
DEFAULT_SPLIT_SEED = "bitmar"
CV_FOLDS = 5

TASK_COLUMNS = ["task_id", "task_text", "task_key", "robots", "instruction", "source", "split"]
SUBTASK_COLUMNS = ["task_id", "subtask_index", "subtask_text", "robot", "execution_order", "split"]
QUARANTINE_COLUMNS = ["source", "key", "reason", "detail"]

_OUTPUT_FIELD: dict[str, str] = {"single": "output", "multi": "original_single_robot_output"}
_REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "single": ("instruction", "input", "output"),
    "multi": ("instruction", "input", "subtasks", "original_single_robot_output"),
}
# Fields only one kind has; used to catch a single file passed as multi and vice versa.
_KIND_MARKERS: dict[str, frozenset[str]] = {
    "single": frozenset({"output"}),
    "multi": frozenset({"subtasks", "original_single_robot_output"}),
}
_SUBTASK_FIELDS = ("subtask", "assigned_robot", "execution_order")
_PROFILE_FIELDS = ("capabilities", "limitations", "environments")

_TASK_PREFIX = re.compile(r"^\s*task\s*:\s*", re.IGNORECASE)
# Apostrophes are deleted rather than spaced so "building’s" and "buildings" agree.
_APOSTROPHES = re.compile(r"['‘’‛ʼ`´′]")
_NON_WORD = re.compile(r"[^\w\s]|_")


class RobotDataFileError(ValueError):
    """A robot data file that cannot be read as a whole (syntax or top-level structure)."""

    def __init__(self, path: Path, position: str, message: str) -> None:
        super().__init__(f"{path}: {position}: {message}")
        self.path = path
        self.position = position


@dataclass(frozen=True)
class RobotIngestResult:
    tasks: pd.DataFrame
    subtasks: pd.DataFrame
    quarantine: pd.DataFrame
    input_rows: dict[str, int]  # source label -> rows read, for the row accounting check


class _Rejected(Exception):
    """A row that goes to quarantine; raised inside row parsing, caught per row."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class _Candidate:
    position: str
    task_text: str
    task_key: str
    robots: tuple[str, ...]
    instruction: str
    subtasks: tuple[tuple[str, str, int], ...]  # (text, canonical robot, execution order)


def normalize_task_text(text: str) -> str:
    """The split/dedup key: no "Task:" prefix, NFKC, casefolded, no punctuation, single spaces."""
    text = unicodedata.normalize("NFKC", text)
    text = _TASK_PREFIX.sub("", text).casefold()
    text = _APOSTROPHES.sub("", text)
    text = _NON_WORD.sub(" ", text)
    return " ".join(text.split())


def assign_split(
    normalized_text: str,
    fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: str = DEFAULT_SPLIT_SEED,
) -> str:
    """Deterministic split for a normalised task text (sha256, so stable across processes)."""
    _check_fractions(fractions)
    digest = hashlib.sha256(f"{seed}\x00{normalized_text}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for name, fraction in zip(SPLITS, fractions, strict=True):
        cumulative += fraction
        if point < cumulative:
            return name
    # Float rounding can leave the cumulative sum a hair below 1.
    return next(
        name
        for name, fraction in reversed(list(zip(SPLITS, fractions, strict=True)))
        if fraction > 0
    )


def cv_fold_of(normalized_text: str, n_folds: int = CV_FOLDS) -> int:
    """The cross-validation fold of a normalised task text: int(sha256(key)) % n_folds."""
    return int(hashlib.sha256(normalized_text.encode()).hexdigest(), 16) % n_folds


def assign_cv_split(normalized_text: str, test_fold: int, n_folds: int = CV_FOLDS) -> str:
    """Split under cross-validation: test = fold `test_fold`, validation = the next fold, train = the rest."""
    if not 0 <= test_fold < n_folds:
        raise ValueError(f"test_fold must be in 0..{n_folds - 1}, got {test_fold}")
    fold = cv_fold_of(normalized_text, n_folds)
    if fold == test_fold:
        return "test"
    return "validation" if fold == (test_fold + 1) % n_folds else "train"


def _task_split(normalized_text: str, fractions: Sequence[float], seed: str, cv_fold: int | None) -> str:
    if cv_fold is None:
        return assign_split(normalized_text, fractions, seed)
    return assign_cv_split(normalized_text, cv_fold)


def fleet_profiles(tasks: pd.DataFrame) -> dict[str, dict[str, list[str]]]:
    """The fleet's profiles as the train split's instruction states them (`parse_instruction_capabilities`)."""
    train = tasks[tasks["split"] == "train"]
    if train.empty:
        raise ValueError("robot_tasks has no train split rows: check data.robot and the split fractions")
    return parse_instruction_capabilities(train["instruction"].iloc[0])


def parse_instruction_capabilities(instruction: str) -> dict[str, dict[str, list[str]]]:
    """Parse the capability block: canonical robot -> {capabilities, limitations, environments}.

    Lines before the first "<Robot>:" header (the question preamble) are skipped; an unknown
    robot header or an unexpected line inside the block raises ValueError.
    """
    profiles: dict[str, dict[str, list[str]]] = {}
    current: str | None = None
    for lineno, raw_line in enumerate(instruction.splitlines(), start=1):
        line = raw_line.strip()
        if not line:
            continue
        name, colon, rest = line.partition(":")
        field = name.strip().lower()
        if colon and field in _PROFILE_FIELDS and current is not None:
            profiles[current][field] = [item.strip() for item in rest.split(",") if item.strip()]
        elif colon and not rest.strip():
            robot = normalize_robot_name(name)
            if robot is None:
                raise ValueError(f"instruction line {lineno}: unknown robot header {name!r}")
            if robot in profiles:
                raise ValueError(f"instruction line {lineno}: robot {robot!r} described twice")
            profiles[robot] = {f: [] for f in _PROFILE_FIELDS}
            current = robot
        elif current is not None:
            raise ValueError(f"instruction line {lineno}: unexpected line {line!r}")
    return profiles


def load_robot_records(path: Path, kind: RobotFileKind) -> list[dict]:
    """Read the raw records of a .json or .csv robot file (rows are validated at ingestion)."""
    return [record for _, record in _read_records(Path(path), kind)]


def ingest_robot_datasets(
    single_path: Path | None,
    multi_path: Path | None,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    split_seed: str = DEFAULT_SPLIT_SEED,
    source_name: str | None = None,
    cv_fold: int | None = None,
) -> RobotIngestResult:
    """Ingest the single and/or multi robot files into tasks, subtasks and quarantine tables.

    `source_name` replaces the file name in the `source` column (e.g. "sample"); `cv_fold`
    (0..4) replaces the fraction split by that fold of 5-fold cross-validation (`assign_cv_split`).
    """
    if single_path is None and multi_path is None:
        raise ValueError("ingest_robot_datasets needs at least one of single_path, multi_path")
    _check_fractions(split_fractions)
    tasks: list[dict[str, Any]] = []
    subtasks: list[dict[str, Any]] = []
    quarantine: list[dict[str, str]] = []
    input_rows: dict[str, int] = {}
    kinds: tuple[tuple[RobotFileKind, Path | None], ...] = (
        ("single", single_path),
        ("multi", multi_path),
    )
    for kind, path in kinds:
        if path is None:
            continue
        path = Path(path)
        source = f"{kind}:{source_name or path.name}"
        records = _read_records(path, kind)
        input_rows[source] = len(records)
        candidates: list[_Candidate] = []
        for position, record in records:
            try:
                candidates.append(_parse_row(record, kind, position))
            except _Rejected as rejected:
                quarantine.append(_quarantine_row(source, position, rejected, record))
        for candidate, rejected in _deduplicate(candidates):
            if rejected is not None:
                quarantine.append(
                    {
                        "source": source,
                        "key": candidate.position,
                        "reason": rejected.reason,
                        "detail": f"{rejected.detail} (task: {candidate.task_text!r})",
                    }
                )
                continue
            task_id = _task_id(kind, candidate.task_key)
            split = _task_split(candidate.task_key, split_fractions, split_seed, cv_fold)
            tasks.append(
                {
                    "task_id": task_id,
                    "task_text": candidate.task_text,
                    "task_key": candidate.task_key,
                    "robots": list(candidate.robots),
                    "instruction": candidate.instruction,
                    "source": source,
                    "split": split,
                }
            )
            subtasks.extend(
                {
                    "task_id": task_id,
                    "subtask_index": index,
                    "subtask_text": text,
                    "robot": robot,
                    "execution_order": order,
                    "split": split,
                }
                for index, (text, robot, order) in enumerate(candidate.subtasks)
            )
    return RobotIngestResult(
        tasks=pd.DataFrame(tasks, columns=TASK_COLUMNS),
        subtasks=pd.DataFrame(subtasks, columns=SUBTASK_COLUMNS).astype(
            {"subtask_index": "int64", "execution_order": "int64"}
        ),
        quarantine=pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS),
        input_rows=input_rows,
    )


def _check_fractions(fractions: Sequence[float]) -> None:
    if (
        len(fractions) != len(SPLITS)
        or any(f < 0 for f in fractions)
        or abs(sum(fractions) - 1) > 1e-6
    ):
        raise ValueError(
            f"split fractions must be {len(SPLITS)} non-negative numbers summing to 1 "
            f"({'/'.join(SPLITS)}), got {tuple(fractions)}"
        )


def _task_id(kind: str, task_key: str) -> str:
    # Deduplication keeps at most one row per (kind, key), so this is unique per ingest run.
    return hashlib.sha256(f"{kind}\x00{task_key}".encode()).hexdigest()[:16]


def _display_task_text(text: str) -> str:
    return " ".join(_TASK_PREFIX.sub("", text).split())


def _quarantine_row(source: str, position: str, rejected: _Rejected, record: Any) -> dict[str, str]:
    detail = rejected.detail
    if (
        isinstance(record, dict)
        and isinstance(record.get("input"), str)
        and record["input"].strip()
    ):
        detail = f"{detail} (task: {_display_task_text(record['input'])!r})"
    return {"source": source, "key": position, "reason": rejected.reason, "detail": detail}


def _deduplicate(candidates: list[_Candidate]) -> list[tuple[_Candidate, _Rejected | None]]:
    """Apply the module's duplicate policy; returns rows in file order with their verdict."""
    groups: dict[str, list[_Candidate]] = {}
    for candidate in candidates:
        groups.setdefault(candidate.task_key, []).append(candidate)
    verdicts: dict[str, _Rejected | None] = {}
    for group in groups.values():
        first = group[0]
        if len({c.robots for c in group}) > 1:
            labels = "; ".join(f"{c.position}: {', '.join(c.robots)}" for c in group)
            for c in group:
                verdicts[c.position] = _Rejected(
                    "conflicting_duplicate", f"same task with different robots ({labels})"
                )
            continue
        verdicts[first.position] = None
        for c in group[1:]:
            verdicts[c.position] = _Rejected(
                "duplicate", f"same task and robots as {first.position}"
            )
    return [(c, verdicts[c.position]) for c in candidates]


def _parse_row(record: Any, kind: RobotFileKind, position: str) -> _Candidate:
    if not isinstance(record, dict):
        raise _Rejected("malformed_row", f"expected an object, got {type(record).__name__}")
    if None in record:  # csv.DictReader files surplus cells under the key None
        raise _Rejected("malformed_row", "row has more cells than the header")
    missing = [f for f in _REQUIRED_FIELDS[kind] if record.get(f) is None]
    if missing:
        raise _Rejected("missing_field", f"missing {', '.join(missing)}")
    raw_input, instruction = record["input"], record["instruction"]
    if not isinstance(raw_input, str) or not isinstance(instruction, str):
        raise _Rejected("malformed_row", "input and instruction must be strings")
    task_key = normalize_task_text(raw_input)
    if not task_key:
        raise _Rejected("empty_task", f"input {raw_input!r} has no task text")
    if not instruction.strip():
        raise _Rejected("missing_field", "instruction is empty")
    robots = _parse_robot_output(record[_OUTPUT_FIELD[kind]])
    parsed_subtasks = _parse_subtasks(record["subtasks"]) if kind == "multi" else ()
    return _Candidate(
        position=position,
        task_text=_display_task_text(raw_input),
        task_key=task_key,
        robots=robots,
        instruction=instruction,
        subtasks=parsed_subtasks,
    )


def _parse_robot_output(value: Any) -> tuple[str, ...]:
    """Robots from "Drone, Robot with Legs", ["Drone", ...] or a JSON list in a CSV cell."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise _Rejected(
                "malformed_row", f"robot output {value!r} is not a JSON list: {error}"
            ) from None
    if isinstance(value, str):
        names = split_robot_list(value)
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        names = [name for item in value for name in split_robot_list(item)]
    else:
        raise _Rejected(
            "malformed_row", f"robot output must be text or a list of names, got {value!r}"
        )
    if not names:
        raise _Rejected("empty_output", "no robot named in the output")
    unknown = [name for name in names if normalize_robot_name(name) is None]
    if unknown:
        raise _Rejected("unknown_robot", f"unknown robot name(s): {', '.join(map(repr, unknown))}")
    robots = sorted({normalize_robot_name(name) for name in names}, key=ROBOT_INDEX.__getitem__)
    if "No Robot" in robots and len(robots) > 1:
        raise _Rejected("contradictory_output", f"'No Robot' listed together with {robots}")
    return tuple(robots)


def _parse_subtasks(value: Any) -> tuple[tuple[str, str, int], ...]:
    if isinstance(value, str):  # CSV files carry the subtask list as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise _Rejected("malformed_subtasks", f"subtasks is not valid JSON: {error}") from None
    if not isinstance(value, list) or not value:
        raise _Rejected("malformed_subtasks", "subtasks must be a non-empty list")
    parsed = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise _Rejected("malformed_subtasks", f"subtask {index} is not an object")
        missing = [f for f in _SUBTASK_FIELDS if item.get(f) is None]
        if missing:
            raise _Rejected(
                "malformed_subtasks", f"subtask {index} is missing {', '.join(missing)}"
            )
        text, robot_name, order = item["subtask"], item["assigned_robot"], item["execution_order"]
        if not isinstance(text, str) or not text.strip():
            raise _Rejected("malformed_subtasks", f"subtask {index} has no text")
        robot = normalize_robot_name(robot_name) if isinstance(robot_name, str) else None
        if robot is None:
            raise _Rejected(
                "unknown_robot", f"subtask {index} assigned to unknown robot {robot_name!r}"
            )
        # bool is an int subclass; true/false is not an execution order.
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise _Rejected(
                "malformed_subtasks",
                f"subtask {index} execution_order {order!r} is not a positive integer",
            )
        parsed.append((" ".join(text.split()), robot, order))
    return tuple(parsed)


def _read_records(path: Path, kind: RobotFileKind) -> list[tuple[str, Any]]:
    """(position, record) pairs; the position names the row in quarantine records."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise RobotDataFileError(
            path, "file name", f"unsupported extension {suffix!r}; expected .json or .csv"
        )
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise RobotDataFileError(
            path, f"byte {error.start}", f"not UTF-8 text: {error.reason}"
        ) from None
    if suffix == ".json":
        records, keys = _parse_json(path, text)
    else:
        records, keys = _parse_csv(path, text)
    other: RobotFileKind = "multi" if kind == "single" else "single"
    if keys & _KIND_MARKERS[other] and not keys & _KIND_MARKERS[kind]:
        raise RobotDataFileError(
            path,
            "top level",
            f"records have {other}-robot fields {sorted(keys & _KIND_MARKERS[other])}, "
            f"but the file was given as {kind}-robot data",
        )
    # A JSON record lacking a field is one bad row; a CSV header lacking a column is a bad file.
    missing = [f for f in _REQUIRED_FIELDS[kind] if f not in keys]
    if suffix == ".csv" and missing:
        raise RobotDataFileError(path, "line 1", f"CSV header lacks column(s) {', '.join(missing)}")
    return records


def _parse_json(path: Path, text: str) -> tuple[list[tuple[str, Any]], set[str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise RobotDataFileError(
            path, f"line {error.lineno}, column {error.colno}", error.msg
        ) from None
    if not isinstance(data, list):
        start = len(text) - len(text.lstrip())
        line = text.count("\n", 0, start) + 1
        column = start - (text.rfind("\n", 0, start) + 1) + 1
        raise RobotDataFileError(
            path,
            f"line {line}, column {column}",
            f"expected a JSON array of task objects, got {type(data).__name__}",
        )
    keys = {key for record in data if isinstance(record, dict) for key in record}
    return [(f"[{index}]", record) for index, record in enumerate(data)], keys


def _parse_csv(path: Path, text: str) -> tuple[list[tuple[str, Any]], set[str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    records: list[tuple[str, Any]] = []
    try:
        header = reader.fieldnames
        if not header:
            raise RobotDataFileError(path, "line 1", "empty CSV file; expected a header row")
        start_line = reader.line_num + 1
        for row in reader:
            # A quoted cell may span lines; name the line the row starts on.
            records.append((f"line {start_line}", row))
            start_line = reader.line_num + 1
    except csv.Error as error:
        raise RobotDataFileError(
            path, f"line {reader.line_num}", f"malformed CSV: {error}"
        ) from None
    return records, set(header)
