"""Reasoning targets built from the data: exact texts on hand-made tasks, invariants on the real data."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import pandas as pd
import pytest

from bitmar_model.reasoning_format import parse_reasoning, robots_mentioned_positively
from bitmar_model.rewards import compute_rewards
from bitmar_pipeline.data.robot_sample import ROBOT_SELECTION_INSTRUCTION
from bitmar_pipeline.data.robot_tasks import (
    SPLITS,
    TASK_COLUMNS,
    ingest_robot_datasets,
    normalize_task_text,
    parse_instruction_capabilities,
)
from bitmar_pipeline.training.reasoning_targets import (
    EVALUATED_ROBOTS,
    SftExample,
    build_reasoning_target,
    build_sft_examples,
    capability_examples,
    evaluable_subtasks,
    format_prompt,
    short_form,
    short_form_examples,
    task_cue_phrases,
)

PROFILES = parse_instruction_capabilities(ROBOT_SELECTION_INSTRUCTION)
PIPES = "Check the condition of underwater pipes for any leaks."


def test_format_prompt_collapses_whitespace():
    assert format_prompt("  Inspect  the\nroof. ") == "Task: Inspect the roof."


def test_single_robot_target_is_exact():
    assert build_reasoning_target(PIPES, ["underwater"], PROFILES, None) == (
        "<thinking>\nGoal: Check the condition of underwater pipes for any leaks.\n</thinking>\n"
        "<environment_analysis>\n"
        "Cues: underwater, pipes, underwater navigation, underwater manipulation.\n"
        "</environment_analysis>\n"
        "<robot_evaluation>\n"
        "Drone: unsuitable - limited payload\n"
        "Underwater Robot: suitable - underwater navigation\n"
        "Humanoid: unsuitable - slow movement\n"
        "Robot with Wheels: unsuitable - flat surfaces only\n"
        "Robot with Legs: unsuitable - limited manipulation\n"
        "</robot_evaluation>\n"
        "<selection_reasoning>\nUnderwater Robot fits: underwater navigation.\n</selection_reasoning>\n"
        "<confidence_check>\nOne robot needed, all cued by the task.\n</confidence_check>\n"
        "<robot_selection>\n"
        "Selected Robot: Underwater Robot\n"
        "Confidence: 0.90\n"
        "Justification: Best match: underwater navigation.\n"
        "</robot_selection>"
    )


def test_multi_robot_target_lists_one_role_per_selected_robot():
    plan = [
        ("Scout the roof", "Drone"),
        ("Guide people", "Humanoid"),  # not selected: left out of the roles
        ("Carry supplies up the stairs", "Robot with Legs"),
        ("Photograph the roof", "Drone"),  # Drone already has a role
    ]
    text = build_reasoning_target(
        "Carry supplies up a staircase, then inspect the roof.",
        ["Robot with Legs", "Drone"],
        PROFILES,
        plan,
    )
    parsed = parse_reasoning(text)
    assert parsed.well_formed
    assert parsed.robots == ["Drone", "Robot with Legs"]
    assert parsed.confidence == 0.8  # two robots, both cued by the text
    # "staircase" cues "stairs" (prefix rule); "carry" cues "load carrying" (suffix rule).
    assert parsed.sections["environment_analysis"] == (
        "Cues: stairs, aerial inspection, marine inspection, load carrying."
    )
    assert parsed.sections["selection_reasoning"] == (
        "Drone fits: aerial inspection; Robot with Legs fits: load carrying. Roles: "
        "Subtask 1 (Scout the roof) -> Drone; Subtask 3 (Carry supplies up the stairs) -> Robot with Legs."
    )


def test_uncued_robots_fall_back_to_their_profile_and_lower_confidence():
    text = build_reasoning_target(
        "Perform rapid exploration of a vast desert.", ["Robot with Wheels"], PROFILES, None
    )
    parsed = parse_reasoning(text)
    assert "Robot with Wheels: suitable - fast movement" in parsed.sections["robot_evaluation"]
    assert parsed.sections["confidence_check"] == "One robot needed, not all cued by the task."
    assert parsed.confidence == 0.8
    # Three uncued robots: 0.9 - 0.2 - 0.1, and four never go below the 0.5 floor.
    three = parse_reasoning(
        build_reasoning_target("Do it.", ["Drone", "Humanoid", "Robot with Legs"], PROFILES, None)
    )
    assert three.confidence == 0.6
    four = parse_reasoning(
        build_reasoning_target("Do it.", list(EVALUATED_ROBOTS[:4]), PROFILES, None)
    )
    assert four.confidence == 0.5


def test_prefix_rule_does_not_match_short_stems():
    text = build_reasoning_target("Inspect the cables under a bridge.", ["Drone"], PROFILES, None)
    analysis = parse_reasoning(text).sections["environment_analysis"]
    assert "underwater" not in analysis
    assert analysis == "Cues: aerial inspection, marine inspection, inspection."


def test_a_limitation_named_by_the_task_is_cited():
    text = build_reasoning_target(
        "Move a heavy payload across the warehouse.", ["Robot with Wheels"], PROFILES, None
    )
    evaluation = parse_reasoning(text).sections["robot_evaluation"]
    assert "Drone: unsuitable - limited payload" in evaluation
    assert "Robot with Wheels: suitable - good payload" in evaluation


def test_no_robot_target_calls_every_robot_unsuitable():
    parsed = parse_reasoning(build_reasoning_target("Sing a song.", ["No Robot"], PROFILES, None))
    assert parsed.well_formed
    assert parsed.robots == ["No Robot"]
    assert robots_mentioned_positively(parsed.sections["robot_evaluation"]) == set()
    assert parsed.confidence == 0.9


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="lack"):
        build_reasoning_target(
            PIPES, ["Drone"], {k: v for k, v in PROFILES.items() if k != "Humanoid"}, None
        )
    with pytest.raises(ValueError, match="unknown robot"):
        build_reasoning_target(PIPES, ["Submarine"], PROFILES, None)


def _tasks(rows: list[tuple[str, str, list[str], str, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "task_id": task_id,
                "task_text": text,
                "task_key": normalize_task_text(text),
                "robots": robots,
                "instruction": ROBOT_SELECTION_INSTRUCTION,
                "source": source,
                "split": split,
            }
            for task_id, text, robots, source, split in rows
        ],
        columns=TASK_COLUMNS,
    )


def _subtasks(rows: list[tuple[str, int, str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "task_id": t,
                "subtask_index": i,
                "subtask_text": x,
                "robot": r,
                "execution_order": i + 1,
                "split": s,
            }
            for t, i, x, r, s in rows
        ]
    )


def test_sft_examples_deduplicate_prefer_plans_and_keep_to_the_split():
    tasks = _tasks(
        [
            ("s1", "Inspect the roof.", ["Drone"], "single:f", "train"),
            ("m1", "Inspect the roof", ["Drone"], "multi:f", "train"),
            ("s2", "Clean the pool.", ["Underwater Robot"], "single:f", "train"),
            ("s3", "Fix a pipe.", ["Humanoid"], "single:f", "train"),
            ("m3", "Fix a pipe.", ["Underwater Robot"], "multi:f", "train"),  # conflicting labels
            ("m4", "Guard the gate.", ["Robot with Legs"], "multi:f", "test"),
        ]
    )
    subtasks = _subtasks(
        [
            ("m1", 0, "Scan the roof", "Drone", "train"),
            ("m1", 1, "Log findings", "Humanoid", "train"),
            ("m3", 0, "Scan the roof", "Drone", "train"),  # same text and robot: one example
            ("m3", 1, "Log findings", "Robot with Legs", "train"),  # conflicting: skipped
            ("m4", 0, "Patrol the fence", "Robot with Legs", "test"),  # other split: never used
        ]
    )
    examples = build_sft_examples(tasks, subtasks, PROFILES, split="train")
    summary = [(e.kind, e.task_id, e.prompt, e.robots) for e in examples]
    assert summary == [
        ("task", "m1", "Task: Inspect the roof", ["Drone"]),
        ("task", "s2", "Task: Clean the pool.", ["Underwater Robot"]),
        ("subtask", "m1", "Task: Scan the roof", ["Drone"]),
    ]
    assert all(parse_reasoning(e.target).robots == e.robots for e in examples)
    test_examples = build_sft_examples(tasks, subtasks, PROFILES, split="test")
    assert [(e.kind, e.prompt) for e in test_examples] == [
        ("task", "Task: Guard the gate."),
        ("subtask", "Task: Patrol the fence"),
    ]


def test_evaluable_subtasks_drop_training_texts_and_union_conflicting_labels():
    tasks = _tasks(
        [
            ("m1", "Inspect the roof", ["Drone"], "multi:f", "train"),
            ("m2", "Guard the gate.", ["Robot with Legs"], "multi:f", "test"),
            ("m3", "Fix the hull.", ["Underwater Robot"], "multi:f", "test"),
        ]
    )
    subtasks = _subtasks(
        [
            ("m1", 0, "Scan the roof", "Drone", "train"),
            ("m1", 1, "Log findings", "Humanoid", "train"),
            ("m2", 0, "Scan  the roof!", "Drone", "test"),  # a training text after normalisation
            ("m2", 1, "Carry the tools", "Robot with Legs", "test"),
            ("m2", 2, "Dive to the hull", "Underwater Robot", "test"),
            ("m3", 0, "Dive to the hull", "Underwater Robot", "test"),  # same label: one item
            ("m3", 1, "carry the tools.", "Humanoid", "test"),  # conflicting label
            ("m3", 2, "Inspect the roof", "Drone", "test"),  # a training task text
        ]
    )
    test = evaluable_subtasks(tasks, subtasks, "test")
    assert test.texts == ["Carry the tools", "Dive to the hull"]
    assert test.gold == [["Humanoid", "Robot with Legs"], ["Underwater Robot"]]
    assert (test.excluded_seen_in_training, test.conflicting_labels) == (2, 1)
    assert evaluable_subtasks(tasks, subtasks, "validation").texts == []
    train = evaluable_subtasks(tasks, subtasks, "train")
    assert (train.texts, train.excluded_seen_in_training) == ([], 2)


# --- real data -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_examples(robot_data: Path):
    result = ingest_robot_datasets(
        robot_data / "single_robot_selection.json",
        robot_data / "multi_robot_selection_dataset.json",
    )
    profiles = parse_instruction_capabilities(result.tasks["instruction"].iloc[0])
    examples = {
        split: build_sft_examples(result.tasks, result.subtasks, profiles, split)
        for split in SPLITS
    }
    return result.tasks, examples


def test_real_example_counts(real_examples):
    _, examples = real_examples
    counts = {
        split: {kind: sum(e.kind == kind for e in ex) for kind in ("task", "subtask")}
        for split, ex in examples.items()
    }
    # 244 distinct tasks (the two files share them); subtask texts are a small, reused set.
    assert counts == {
        "train": {"task": 173, "subtask": 33},
        "validation": {"task": 40, "subtask": 25},
        "test": {"task": 31, "subtask": 31},
    }
    # Every multi row has a plan, so each task example comes from the multi file.
    train_ids = {e.task_id for e in examples["train"] if e.kind == "task"}
    assert len(train_ids) == 173


def test_real_train_examples_do_not_leak_held_out_tasks(real_examples):
    tasks, examples = real_examples
    held_out = set(tasks.loc[tasks["split"] != "train", "task_key"])
    train_keys = {normalize_task_text(e.prompt) for e in examples["train"]}
    assert not train_keys & held_out
    train_task_ids = set(tasks.loc[tasks["split"] == "train", "task_id"])
    assert {e.task_id for e in examples["train"]} <= train_task_ids


def test_real_targets_parse_back_to_their_labels_and_earn_full_reward(real_examples):
    _, examples = real_examples
    flat = [e for ex in examples.values() for e in ex]
    for example in flat:
        parsed = parse_reasoning(example.target)
        assert parsed.well_formed, (example.prompt, parsed.errors)
        assert parsed.robots == example.robots
        assert robots_mentioned_positively(parsed.sections["robot_evaluation"]) == set(
            example.robots
        )
    gold = [set(e.robots) for e in flat]
    rewards = compute_rewards([e.target for e in flat], gold, gold)
    assert set(rewards.selection) == set(rewards.format) == set(rewards.consistency) == {1.0}


def test_real_targets_are_short(real_examples):
    _, examples = real_examples
    words = [len(e.target.split()) for ex in examples.values() for e in ex]
    chars = [len(e.target) for ex in examples.values() for e in ex]
    assert statistics.mean(words) < 100 and max(words) <= 150
    assert statistics.mean(chars) < 850 and max(chars) <= 1200


def test_real_evaluable_subtasks_never_were_sft_prompts(real_examples, robot_data: Path):
    tasks, examples = real_examples
    subtasks = ingest_robot_datasets(
        robot_data / "single_robot_selection.json",
        robot_data / "multi_robot_selection_dataset.json",
    ).subtasks
    trained = {normalize_task_text(e.prompt) for e in examples["train"]}
    counts = {}
    for split in ("validation", "test"):
        held_out = evaluable_subtasks(tasks, subtasks, split)
        assert not {normalize_task_text(t) for t in held_out.texts} & trained
        assert all(held_out.gold)
        counts[split] = (len(held_out.texts), held_out.excluded_seen_in_training)
    # The public plans reuse a small set of subtask texts across splits: most held-out
    # subtask prompts are verbatim training prompts and are not evaluated.
    assert counts == {"validation": (0, 28), "test": (4, 28)}


def test_capability_examples_label_each_phrase_with_every_robot_that_lists_it():
    examples = capability_examples(PROFILES)
    by_text = {e.prompt: e for e in examples}
    for robot, profile in PROFILES.items():
        for phrase in profile["capabilities"]:
            example = by_text[format_prompt(f"a task that needs {phrase.lower()}")]
            assert robot in example.robots
        for phrase in profile["environments"]:
            owners = {r for r, p in PROFILES.items() if phrase.lower() in (e.lower() for e in p["environments"])}
            assert set(by_text[format_prompt(f"a task in {phrase.lower()}")].robots) == owners
    assert {r for e in examples for r in e.robots} == set(PROFILES)
    for example in examples:  # the target says what the label says
        assert set(parse_reasoning(example.target).robots) == set(example.robots)


def test_short_forms_keep_the_verb_and_drop_most_function_words():
    rng = random.Random(0)
    forms = [short_form(PIPES, rng) for _ in range(200)]
    drawn = [f for f in forms if f]
    assert len(drawn) > 150
    for form in drawn:
        words = form.split()
        assert words[0] == "Check" and 2 <= len(words) < len(PIPES.split())
        # Order kept: the words are a subsequence of the task's.
        remaining = iter(PIPES.rstrip(".").split())
        assert all(any(w == r for r in remaining) for w in words)
    dropped_the = sum("the" not in f.split() for f in drawn) / len(drawn)
    assert dropped_the > 0.7


def test_short_form_examples_keep_labels_and_build_targets_from_the_short_text():
    task = SftExample("t1", format_prompt(PIPES), "target", ["Underwater Robot"], "task")
    subtask = SftExample("t1", format_prompt("Swim"), "target", ["Underwater Robot"], "subtask")
    examples = short_form_examples([task, subtask], PROFILES, per_task=3, seed=1)
    assert 1 <= len(examples) <= 3 and all(e.kind == "short_form" for e in examples)
    for example in examples:
        text = example.prompt.removeprefix("Task: ")
        assert example.robots == ["Underwater Robot"]
        assert f"Goal: {text}." in example.target
        assert parse_reasoning(example.target).robots == ["Underwater Robot"]
    assert short_form_examples([task, subtask], PROFILES, per_task=3, seed=1) == examples


def test_task_cue_phrases_are_runs_of_the_tasks_content_words():
    assert task_cue_phrases("Scrape barnacles off a ship hull.") == [
        "Scrape barnacles", "ship hull", "Scrape barnacles, ship hull"
    ]
    assert task_cue_phrases("Inspect underwater pipelines") == ["Inspect underwater pipelines"]
    # Punctuation ends a run, runs are at most four words, repeats are dropped.
    assert task_cue_phrases("Deliver food, water; deliver food") == [
        "Deliver food", "water", "deliver food", "Deliver food, water, deliver food"
    ]
    assert task_cue_phrases("one two three four five") == ["one two three four", "five", "one two three four, five"]
    assert task_cue_phrases("the of a") == [] and task_cue_phrases("") == []
