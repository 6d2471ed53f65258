"""The user-phrased robustness section of evaluation_report and the committed sets it reads."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from bitmar_model.config import BitMarConfig
from bitmar_model.modeling import BitMarModel
from bitmar_model.reasoning_format import ReasoningTrace, format_reasoning, parse_reasoning
from bitmar_model.robots import ROBOT_CLASSES, normalize_robot_name
from bitmar_pipeline.evaluation.robustness import (
    README_EXAMPLES_FILE,
    USER_PHRASED_FILE,
    USER_PHRASED_VALIDATION_FILE,
    evaluation_contradictions,
    headline_metadata,
    load_eval_set,
    user_phrased_section,
)
from bitmar_pipeline.text.tokenizer import train_bpe_tokenizer

README = {
    "Inspect underwater pipelines": "Underwater Robot",
    "Survey construction site from above": "Drone",
    "Navigate crowded indoor mall": "Humanoid",
    "Transport heavy equipment across terrain": "Robot with Legs",
    "Delicate laboratory manipulation": "Humanoid",
}


@pytest.mark.parametrize("path", [USER_PHRASED_FILE, USER_PHRASED_VALIDATION_FILE], ids=["test", "validation"])
def test_user_set_parses_and_covers_every_robot(path) -> None:
    tasks = load_eval_set(path)
    assert len(tasks) == 56
    assert len({t.task.casefold() for t in tasks}) == len(tasks)
    per_robot = Counter(robot for t in tasks for robot in t.robots)
    assert all(per_robot[robot] >= 8 for robot in ROBOT_CLASSES if robot != "No Robot"), per_robot
    assert per_robot["No Robot"] == 6
    # "No Robot" is never combined with a robot.
    assert all(len(t.robots) == 1 for t in tasks if "No Robot" in t.robots)


def test_the_user_validation_set_shares_no_task_with_the_test_set_or_the_readme_five() -> None:
    validation = {t.task.casefold() for t in load_eval_set(USER_PHRASED_VALIDATION_FILE)}
    others = {t.task.casefold() for path in (USER_PHRASED_FILE, README_EXAMPLES_FILE) for t in load_eval_set(path)}
    assert not validation & others


def test_readme_examples_are_the_seed_five() -> None:
    tasks = load_eval_set(README_EXAMPLES_FILE)
    assert {t.task: t.robots for t in tasks} == {task: (robot,) for task, robot in README.items()}


def test_every_gold_name_is_canonical() -> None:
    for path in (USER_PHRASED_FILE, USER_PHRASED_VALIDATION_FILE, README_EXAMPLES_FILE):
        for task in load_eval_set(path):
            assert all(normalize_robot_name(r) == r for r in task.robots)


def test_unknown_robot_name_is_rejected(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"tasks": [{"task": "Fly", "robots": ["Jetpack"]}]}')
    with pytest.raises(ValueError, match="Jetpack"):
        load_eval_set(path)


def _trace(selected: list[str], suitable: set[str]) -> str:
    evaluation = {r: (r in suitable, "reason") for r in ROBOT_CLASSES if r != "No Robot"}
    return format_reasoning(
        ReasoningTrace(
            thinking="t", environment_analysis="e", robot_evaluation=evaluation, selection_reasoning="s",
            confidence_check="c", robots=selected, confidence=0.5, justification="j",
        )
    )


def test_contradiction_counts_a_selected_robot_called_unsuitable() -> None:
    texts = [
        _trace(["Drone"], {"Drone"}),  # consistent
        _trace(["Underwater Robot"], {"Drone"}),  # selected, called unsuitable
        _trace(["No Robot"], set()),  # rejecting all robots contradicts nothing
    ]
    counts = evaluation_contradictions([parse_reasoning(t) for t in texts])
    assert counts == {"robot_evaluation_contradictions": 1, "selected_not_evaluated": 0}
    missing = parse_reasoning("<robot_selection>\nSelected Robot: Drone\nConfidence: 0.5\n</robot_selection>")
    assert evaluation_contradictions([missing]) == {"robot_evaluation_contradictions": 0, "selected_not_evaluated": 1}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[BitMarModel, object]:
    texts = [f"Task: {t.task}" for t in load_eval_set(USER_PHRASED_FILE)]
    tokenizer = train_bpe_tokenizer(texts * 3, 300, tmp_path_factory.mktemp("tokenizer"), min_frequency=1)
    config = BitMarConfig.tiny(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return BitMarModel(config).eval(), tokenizer


def test_section_on_a_tiny_untrained_model(tiny) -> None:
    model, tokenizer = tiny
    section = user_phrased_section(model, tokenizer, max_new_tokens=8, n_resamples=50)
    user, readme = section["user_set"], section["readme_examples"]
    assert (user["n"], readme["n"], user["no_robot_tasks"]) == (56, 5, 6)
    for key in ("head_top1", "head_exact_set", "head_sample_f1", "text_hit", "relevance"):
        metric = user[key]
        assert metric["n"] == 56
        assert metric["ci95_low"] <= metric["value"] <= metric["ci95_high"], key
    assert sum(r["n"] for r in user["per_robot"].values()) == 59  # three tasks have two gold robots
    head_hits = sum(r["head_hits"] for r in user["per_robot"].values())
    assert head_hits >= round(user["head_top1"]["value"] * 56)
    assert isinstance(user["robot_evaluation_contradictions"], int)
    validation = section["user_validation_set"]
    assert (validation["file"], validation["n"]) == (USER_PHRASED_VALIDATION_FILE.name, 56)
    assert sum(r["n"] for r in validation["per_robot"].values()) == 58  # two tasks have two gold robots
    examples = readme["examples"]
    assert [e["task"] for e in examples] == list(README)
    assert all(e["head_pick"] in ROBOT_CLASSES and 0.0 <= e["head_probability"] <= 1.0 for e in examples)
    assert readme["head_hits"] == sum(e["head_pick"] == README[e["task"]] for e in examples)
    headline = headline_metadata(section)
    assert headline["user_phrased_head_top1"] == user["head_top1"]["value"]
    assert headline["readme_examples_head_hits"] == readme["head_hits"]
    assert headline["user_phrased_validation_head_top1"] == validation["head_top1"]["value"]
    assert np.isfinite(list(headline.values())).all()


def test_the_report_says_when_the_user_validation_set_chose_a_setting() -> None:
    from bitmar_pipeline.evaluation.robustness import user_validation_use

    chosen = {"knowledge_fit_multiple": 2.0, "knowledge_fit_chosen_on": "dataset validation (34 tasks) + "
              "user-phrased validation set (56 tasks, user_phrased_robot_tasks_validation.json)"}
    assert "multiple 2.0" in user_validation_use(chosen) and "not a held-out one" in user_validation_use(chosen)
    assert user_validation_use({**chosen, "knowledge_fit_chosen_on": "dataset validation (34 tasks)"}) is None
    assert user_validation_use({"knowledge_source": "robot labels only"}) is None
    gated = {
        **chosen, "knowledge_no_robot_threshold": 0.9, "knowledge_no_robot_chosen_on": chosen["knowledge_fit_chosen_on"]
    }
    use = user_validation_use(gated)
    assert "multiple 2.0" in use and "the no-robot gate's threshold (0.9)" in use
