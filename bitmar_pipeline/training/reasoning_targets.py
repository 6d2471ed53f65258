"""Supervised reasoning targets built from the robot selection data itself (no model, no LLM).

Every target is a `format_reasoning` trace whose facts come from the task text, the gold
robots, the robot profiles of the dataset's instruction and (for multi-robot tasks) the
subtask plan. The model is tiny, so targets stay short: on the real data about 95
whitespace-separated words on average (tags included), 140 at most.

Keyword rule (the only "judgement" in a target): a profile phrase such as "aerial
inspection" or "uneven terrain" is *cued* by a task when one of its content words (4+
letters, not a generic word like "areas") matches a task word. Words match when their
stems (a few English suffixes cut) are equal, or when the shorter stem has 5+ letters,
starts the longer one and is at most 4 letters shorter ("stair"/"staircase"), which
keeps "under" from matching "underwater".

- environment_analysis lists the cued environments, then cued capabilities (at most 4).
- robot_evaluation marks exactly the gold robots suitable (so the evaluation and the
  selection agree); a gold robot cites its first cued capability or environment, else its
  first listed capability; any other robot cites its first cued limitation, else its first
  listed limitation.
- Confidence: 0.9 for one gold robot, 0.1 less per extra robot (a split decision is less
  certain), 0.1 less again when some gold robot has no cue in the text; never below 0.5.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd

from bitmar_model.guided import (  # Profiles: robot -> capabilities / limitations / environments
    NO_ROBOT_CHECK,
    NO_ROBOT_JUSTIFICATION,
    NO_ROBOT_REASON,
    Profiles,
)
from bitmar_model.reasoning_format import (
    NO_ROBOT,
    ReasoningTrace,
    canonical_robots,
    format_reasoning,
)
from bitmar_model.robots import ROBOT_CLASSES, ROBOT_INDEX
from bitmar_pipeline.data.robot_tasks import normalize_task_text

PROMPT_PREFIX = "Task: "
EVALUATED_ROBOTS: tuple[str, ...] = tuple(r for r in ROBOT_CLASSES if r != NO_ROBOT)
MAX_ENVIRONMENT_CUES = 4

_WORD_RE = re.compile(r"[a-z]+")
_SUFFIXES = ("ions", "ion", "ings", "ing", "es", "ed", "s")  # longest first
_MIN_WORD = 4
# Stems too generic to cue anything ("areas" in "hard to reach areas" and "flat outdoor areas").
_GENERIC = frozenset(
    {"area", "space", "task", "complex", "large", "environment", "limit", "only", "high", "good"}
)
_MIN_PREFIX = 5
_MAX_PREFIX_GAP = 4


@dataclass
class SftExample:
    task_id: str
    prompt: str
    target: str
    robots: list[str]
    kind: Literal["task", "subtask", "capability", "short_form"]


def format_prompt(task_text: str) -> str:
    """The decoder prompt for a task; training and inference must share this exact format."""
    return f"{PROMPT_PREFIX}{' '.join(task_text.split())}"


def task_goal(task_text: str) -> str:
    """The task as the "Goal:" line of the targets states it: whitespace collapsed, no final period."""
    return " ".join(task_text.split()).rstrip(".")


def _stem(word: str) -> str:
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= _MIN_WORD:
            return word[: -len(suffix)]
    return word


def _stems(text: str) -> set[str]:
    stems = {_stem(w) for w in _WORD_RE.findall(text.lower()) if len(w) >= _MIN_WORD}
    return stems - _GENERIC


def _stems_match(a: str, b: str) -> bool:
    short, long = sorted((a, b), key=len)
    return short == long or (
        len(short) >= _MIN_PREFIX
        and long.startswith(short)
        and len(long) - len(short) <= _MAX_PREFIX_GAP
    )


def _cued(phrases: Sequence[str], task_stems: set[str]) -> list[str]:
    """The phrases (in profile order) one of whose content words matches a task word."""
    return [
        phrase
        for phrase in phrases
        if any(_stems_match(p, t) for p in _stems(phrase) for t in task_stems)
    ]


def profile_cues(task_text: str, profile: Mapping[str, Sequence[str]]) -> list[str]:
    """The robot's capabilities, then environments, that a content word of the task names (stem match):
    the targets' reason when there is one, and what "all cued by the task" checks."""
    stems = _stems(task_goal(task_text))
    return _cued(profile.get("capabilities", ()), stems) + _cued(profile.get("environments", ()), stems)


def _check_profiles(capabilities: Profiles) -> None:
    missing = [robot for robot in EVALUATED_ROBOTS if robot not in capabilities]
    if missing:
        raise ValueError(
            f"robot profiles lack {missing}; targets evaluate all of {list(EVALUATED_ROBOTS)}"
        )
    for robot in EVALUATED_ROBOTS:
        for field in ("capabilities", "limitations"):
            if not capabilities[robot].get(field):
                raise ValueError(f"{robot} profile has no {field}, which targets cite")


def _ordered(robots: Sequence[str]) -> list[str]:
    # One fixed order (ROBOT_CLASSES) so the model never learns two spellings of a selection.
    return sorted(canonical_robots(robots), key=ROBOT_INDEX.__getitem__)


def _confidence(robots: list[str], all_cued: bool) -> float:
    if robots == [NO_ROBOT]:
        return 0.9
    confidence = 0.9 - 0.1 * (len(robots) - 1) - (0.0 if all_cued else 0.1)
    return round(max(0.5, confidence), 2)


def build_reasoning_target(
    task_text: str,
    robots: list[str],
    capabilities: Profiles,
    subtasks: list[tuple[str, str]] | None,
) -> str:
    """The tagged reasoning text for `task_text` with gold `robots`.

    `capabilities` maps each robot to its profile (`parse_instruction_capabilities`);
    `subtasks` is the (text, assigned robot) plan, in execution order, when there is one.
    """
    _check_profiles(capabilities)
    gold = _ordered(robots)
    task = task_goal(task_text)
    task_stems = _stems(task)

    cues: list[str] = []
    for field in ("environments", "capabilities"):
        for robot in EVALUATED_ROBOTS:
            cues += [
                c for c in _cued(capabilities[robot].get(field, ()), task_stems) if c not in cues
            ]
    if cues:
        environment = f"Cues: {', '.join(cues[:MAX_ENVIRONMENT_CUES])}."
    else:
        environment = "No listed environment or capability is named in the task."

    evaluation: dict[str, tuple[bool, str]] = {}
    reasons: dict[str, str] = {}
    all_cued = True
    for robot in EVALUATED_ROBOTS:
        profile = capabilities[robot]
        if robot in gold:
            matched = profile_cues(task_text, profile)
            all_cued = all_cued and bool(matched)
            reasons[robot] = matched[0] if matched else profile["capabilities"][0]
            evaluation[robot] = (True, reasons[robot])
        else:
            limits = _cued(profile["limitations"], task_stems) or list(profile["limitations"])
            evaluation[robot] = (False, limits[0])

    if gold == [NO_ROBOT]:
        selection, justification, check = NO_ROBOT_REASON, NO_ROBOT_JUSTIFICATION, NO_ROBOT_CHECK
    else:
        selection = "; ".join(f"{robot} fits: {reasons[robot]}" for robot in gold) + "."
        justification = f"Best match: {', '.join(reasons[robot] for robot in gold)}."
        # Each selected robot's first subtask shows its role. Subtasks assigned to other
        # robots are left out: the dataset's plans often use robots outside the gold
        # selection (17 of 244 real plans use exactly the gold robots).
        roles: dict[str, tuple[int, str]] = {}
        for i, (text, robot) in enumerate(subtasks or (), 1):
            if robot in gold and robot not in roles:
                roles[robot] = (i, text.rstrip("."))
        if len(gold) > 1 and roles:
            steps = sorted((i, text, robot) for robot, (i, text) in roles.items())
            selection += (
                " Roles: "
                + "; ".join(f"Subtask {i} ({text}) -> {robot}" for i, text, robot in steps)
                + "."
            )
        count = "One robot" if len(gold) == 1 else f"{len(gold)} robots"
        check = f"{count} needed, {'all' if all_cued else 'not all'} cued by the task."

    return format_reasoning(
        ReasoningTrace(
            thinking=f"Goal: {task}.",
            environment_analysis=environment,
            robot_evaluation=evaluation,
            selection_reasoning=selection,
            confidence_check=check,
            robots=gold,
            confidence=_confidence(gold, all_cued),
            justification=justification,
        )
    )


def _task_subtasks(subtasks_df: pd.DataFrame, task_id: str) -> list[tuple[str, str]]:
    rows = subtasks_df[subtasks_df["task_id"] == task_id].sort_values(
        ["execution_order", "subtask_index"]
    )
    return list(zip(rows["subtask_text"], rows["robot"], strict=True))


def _split_subtasks(tasks_df: pd.DataFrame, subtasks_df: pd.DataFrame, split: str) -> pd.DataFrame:
    """Subtask rows of the tasks of `split`, with their normalised text as `key`."""
    task_ids = set(tasks_df.loc[tasks_df["split"] == split, "task_id"])
    subtasks = subtasks_df[subtasks_df["task_id"].isin(task_ids)]
    return subtasks.assign(key=subtasks["subtask_text"].map(normalize_task_text))


@dataclass(frozen=True)
class EvaluableSubtasks:
    """Held-out subtask prompts of one split, one per normalised text, in first-seen order."""

    texts: list[str]
    gold: list[list[str]]  # every robot the split's rows assign to the text, class order
    excluded_seen_in_training: int  # distinct texts left out because training has them
    conflicting_labels: int  # evaluated texts whose rows assign different robots


def training_text_keys(tasks_df: pd.DataFrame, subtasks_df: pd.DataFrame) -> set[str]:
    """Normalised texts of every train-split task and subtask: a superset of the SFT and
    GRPO prompts (it also holds texts SFT skips for conflicting labels)."""
    train_tasks = tasks_df.loc[tasks_df["split"] == "train", "task_text"].map(normalize_task_text)
    return set(train_tasks) | set(_split_subtasks(tasks_df, subtasks_df, "train")["key"])


def evaluable_subtasks(tasks_df: pd.DataFrame, subtasks_df: pd.DataFrame, split: str) -> EvaluableSubtasks:
    """The subtask prompts of `split` that may be evaluated: those whose normalised text no
    training row has (plans reuse subtask texts across splits, so the parent task's split
    alone leaks training prompts). A text that rows assign to different robots keeps all
    of them as multi-label gold: each is an assignment the data makes, none is guessed."""
    seen = training_text_keys(tasks_df, subtasks_df)
    subtasks = _split_subtasks(tasks_df, subtasks_df, split)
    texts: list[str] = []
    gold: list[list[str]] = []
    excluded = conflicting = 0
    for key, group in subtasks.groupby("key", sort=False):
        if key in seen:
            excluded += 1
            continue
        robots = _ordered(group["robot"].unique().tolist())
        conflicting += len(robots) > 1
        texts.append(group["subtask_text"].iloc[0])
        gold.append(robots)
    return EvaluableSubtasks(texts, gold, excluded, conflicting)


def build_sft_examples(
    tasks_df: pd.DataFrame,
    subtasks_df: pd.DataFrame,
    capabilities: Profiles,
    split: str = "train",
) -> list[SftExample]:
    """Prompt/target pairs for one split: one "task" example per task_key, then "subtask" ones.

    The single and multi files repeat tasks; the row with a subtask plan is kept (its
    target is richer). A task_key whose rows disagree on the robots is skipped, as robot
    labels are never guessed. Subtask examples come only from tasks of `split`, one per
    distinct subtask text; a text assigned to different robots within the split is
    skipped for the same reason.
    """
    tasks = tasks_df[tasks_df["split"] == split]
    planned = set(subtasks_df["task_id"])
    examples: list[SftExample] = []
    for _, group in tasks.groupby("task_key", sort=False):
        if len({tuple(robots) for robots in group["robots"]}) > 1:
            continue
        with_plan = group[group["task_id"].isin(planned)]
        row = (with_plan if len(with_plan) else group).iloc[0]
        plan = _task_subtasks(subtasks_df, row["task_id"]) if len(with_plan) else None
        robots = _ordered(list(row["robots"]))
        examples.append(
            SftExample(
                task_id=row["task_id"],
                prompt=format_prompt(row["task_text"]),
                target=build_reasoning_target(row["task_text"], robots, capabilities, plan),
                robots=robots,
                kind="task",
            )
        )

    subtasks = _split_subtasks(tasks_df, subtasks_df, split)
    for _, group in subtasks.groupby("key", sort=False):
        if group["robot"].nunique() > 1:
            continue
        row = group.iloc[0]
        examples.append(
            SftExample(
                task_id=row["task_id"],
                prompt=format_prompt(row["subtask_text"]),
                target=build_reasoning_target(
                    row["subtask_text"], [row["robot"]], capabilities, None
                ),
                robots=[row["robot"]],
                kind="subtask",
            )
        )
    return examples


_CAPABILITY_TEMPLATES = (("capabilities", "a task that needs {}"), ("environments", "a task in {}"))


def profile_phrase_forms(profile: Mapping[str, Sequence[str]]) -> list[tuple[str, str]]:
    """(phrase, the text the task knowledge reads for it) of each reason a robot's profile offers
    for selecting it, in the guided decoder's order: its capabilities and environments, worded as
    the capability phrases the knowledge is fitted on ("a task that needs X", "a task in X")."""
    return [
        (p.strip(), template.format(p.strip().lower()))
        for field, template in _CAPABILITY_TEMPLATES
        for p in profile.get(field, ())
        if p.strip()
    ]


def profile_description(robot: str, profile: Mapping[str, Sequence[str]]) -> str:
    """A robot's name, capabilities and environments as one text ("Drone. capabilities: aerial
    navigation, surveillance. environments: outdoor."): what the knowledge's fleet fit reads."""
    parts = [f"{robot}."] + [
        f"{field}: {', '.join(items)}."
        for field, _ in _CAPABILITY_TEMPLATES
        if (items := [p.strip() for p in profile.get(field, ()) if p.strip()])
    ]
    return " ".join(parts)


def capability_phrase_owners(capabilities: Profiles, bare_items: bool = False) -> dict[str, set[str]]:
    """Short tasks built from the fleet's own descriptions ("a task that needs aerial inspection",
    "a task in uneven terrain"; with `bare_items` also the items alone), each mapped to every robot
    whose profile lists the item."""
    owners: dict[str, set[str]] = {}
    for robot, profile in capabilities.items():
        for field, template in _CAPABILITY_TEMPLATES:
            for phrase in profile.get(field, ()):
                item = phrase.strip().lower()
                for text in (item, template.format(item)) if bare_items else (template.format(item),):
                    owners.setdefault(text, set()).add(robot)
    return owners


def capability_examples(capabilities: Profiles) -> list[SftExample]:
    """SFT examples of `capability_phrase_owners`, each labelled with every robot whose profile
    lists the phrase: label-balanced examples of the capability words, which the training
    tasks use only in part and with skewed labels."""
    examples = []
    for text, robots in sorted(capability_phrase_owners(capabilities).items()):
        ordered = _ordered(sorted(robots))
        examples.append(
            SftExample(
                task_id=f"capability:{text}",
                prompt=format_prompt(text),
                target=build_reasoning_target(text, ordered, capabilities, None),
                robots=ordered,
                kind="capability",
            )
        )
    return examples


# Words people leave out when they type a task ("Inspect underwater pipelines").
_FUNCTION_WORDS = frozenset(
    "a an the of for to in on at by with and or its their his her from into onto over under through "
    "across along around during while that which this these those any some all each about off up out then "
    "as is are be it".split()
)
_KEEP_FUNCTION, _KEEP_CONTENT, _MIN_SHORT = 0.15, 0.6, 2
_MAX_CUE_WORDS = 4
_PUNCTUATION = ".,;:!?()\"'"


def task_cue_phrases(task_text: str) -> list[str]:
    """The task's own cue phrases, for the guided "Cues:" line: each run of content words (function
    words and punctuation end a run; at most 4 words), then all runs joined when there are several.
    "Scrape barnacles off a ship hull" -> ["Scrape barnacles", "ship hull", "Scrape barnacles, ship hull"]."""
    runs: list[str] = []
    run: list[str] = []
    for raw in task_text.split():
        word = raw.strip(_PUNCTUATION)
        content = bool(word) and word.lower() not in _FUNCTION_WORDS
        if content:
            run.append(word)
        if run and (not content or raw[-1] in _PUNCTUATION or len(run) == _MAX_CUE_WORDS):
            runs.append(" ".join(run))
            run = []
    runs = list(dict.fromkeys([*runs, " ".join(run)] if run else runs))
    return runs + [", ".join(runs)] if len(runs) > 1 else runs


def short_form(task_text: str, rng: random.Random) -> str | None:
    """A shorter wording of a task, the way people type one: the first word (the verb) kept,
    function words mostly dropped, content words kept with probability 0.6, order unchanged.
    None when the draw leaves fewer than 2 words or the text unchanged."""
    words = task_text.rstrip(".").split()
    kept = words[:1] + [
        w for w in words[1:] if rng.random() < (_KEEP_FUNCTION if w.lower() in _FUNCTION_WORDS else _KEEP_CONTENT)
    ]
    if len(kept) < _MIN_SHORT or len(kept) == len(words):
        return None
    return " ".join(kept)


def short_form_examples(
    examples: Sequence[SftExample], capabilities: Profiles, per_task: int, seed: int
) -> list[SftExample]:
    """Up to `per_task` short forms of each "task" example, with the task's robots and a target
    built from the short text (so its cues and "Goal:" quote what the short text says)."""
    rng = random.Random(seed)
    out: list[SftExample] = []
    for example in examples:
        if example.kind != "task":
            continue
        text = example.prompt.removeprefix(PROMPT_PREFIX)
        forms = {f for f in (short_form(text, rng) for _ in range(per_task)) if f}
        out += [
            SftExample(
                task_id=f"{example.task_id}:short{i}",
                prompt=format_prompt(form),
                target=build_reasoning_target(form, example.robots, capabilities, None),
                robots=example.robots,
                kind="short_form",
            )
            for i, form in enumerate(sorted(forms))
        ]
    return out
