"""The user-phrased robustness part of evaluation_report: does the model hold up on a user's words?

Three committed sets, never trained on (`eval_sets/`):
- `user_phrased_robot_tasks.json`: short tasks written the way people type them, each with
  its gold robot set ("No Robot" where no robot of the fleet should do it);
- `user_phrased_robot_tasks_validation.json`: other tasks of the same kind, the one to decide
  settings on (the set above stays a test set);
- `readme_examples.json`: the seed README's five examples, a test every release should pass.

Each is scored like a split (`evaluate_reasoning`: the head's probabilities and the greedy
reasoning text): head top-1 (top pick in the gold set) with a bootstrap 95% CI, the text hit
(a robot parsed from the reasoning is gold), per-robot hits, the report's relevance rule, and
the count of `<robot_evaluation>` contradictions (below). The README examples are also
listed one by one.

Contradiction rule (the report's coherence rule "every selected robot is called suitable in
<robot_evaluation>", counted where it is violated outright): a text whose parsed selection
holds a robot that its `<robot_evaluation>` block names without calling it suitable. A
selected robot the block does not name at all is counted separately (`selected_not_evaluated`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from transformers import PreTrainedTokenizerBase

from bitmar_model.calibration import PlattCalibration
from bitmar_model.guided import Profiles
from bitmar_model.metrics import bootstrap_ci, ci_dict
from bitmar_model.modeling import BitMarModel
from bitmar_model.reasoning_format import NO_ROBOT, ParsedReasoning, robots_mentioned_positively
from bitmar_model.robots import ROBOT_CLASSES, normalize_robot_name
from bitmar_pipeline.data.robot_tasks import normalize_task_text
from bitmar_pipeline.evaluation.selection_quality import ReasoningEvaluation, evaluate_reasoning

EVAL_SETS_DIR = Path(__file__).resolve().parent / "eval_sets"
USER_PHRASED_FILE = EVAL_SETS_DIR / "user_phrased_robot_tasks.json"
# Same conventions, other tasks: for decisions the dataset's validation tasks cannot make (how a user's
# wording shifts the selection), so that the set above stays an untouched test set. Never trained on.
USER_PHRASED_VALIDATION_FILE = EVAL_SETS_DIR / "user_phrased_robot_tasks_validation.json"
README_EXAMPLES_FILE = EVAL_SETS_DIR / "readme_examples.json"
CONTRADICTION_RULE = (
    "a parsed selection holding a robot that <robot_evaluation> names without calling it suitable "
    "(the report's coherence rule, violated outright)"
)


@dataclass(frozen=True)
class EvalTask:
    task: str
    robots: tuple[str, ...]  # canonical gold set


def load_eval_set(path: Path) -> list[EvalTask]:
    """The tasks of a committed evaluation set; ValueError on an unknown robot name or an empty set."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))["tasks"]
    tasks = []
    for index, row in enumerate(rows):
        robots = tuple(normalize_robot_name(name) for name in row["robots"])
        if not robots or None in robots:
            raise ValueError(f"{path}: task {index} ({row['task']!r}): unknown or missing robots {row['robots']}")
        tasks.append(EvalTask(row["task"], robots))  # type: ignore[arg-type]
    return tasks


def _as_split(tasks: list[EvalTask], split: str) -> pd.DataFrame:
    """The set as rows `evaluate_reasoning` reads (one per distinct task key)."""
    return pd.DataFrame(
        {
            "task_text": [t.task for t in tasks],
            "task_key": [normalize_task_text(t.task) for t in tasks],
            "robots": [list(t.robots) for t in tasks],
            "split": split,
        }
    )


def _head_hits(evaluation: ReasoningEvaluation) -> np.ndarray:
    picks = evaluation.head_probs.argmax(axis=1)
    hits = [ROBOT_CLASSES[int(p)] in gold for p, gold in zip(picks, evaluation.gold, strict=True)]
    return np.array(hits, dtype=float)


def _text_hits(evaluation: ReasoningEvaluation) -> np.ndarray:
    hits = [bool(set(p.robots) & set(g)) for p, g in zip(evaluation.parsed, evaluation.gold, strict=True)]
    return np.array(hits, dtype=float)


def _per_robot(evaluation: ReasoningEvaluation, head: np.ndarray, text: np.ndarray) -> dict[str, dict[str, int]]:
    """For each gold robot: its tasks, and how many the head's top pick / the reasoning text get right."""
    out: dict[str, dict[str, int]] = {}
    for robot in ROBOT_CLASSES:
        rows = [i for i, gold in enumerate(evaluation.gold) if robot in gold]
        if rows:
            out[robot] = {"n": len(rows), "head_hits": int(head[rows].sum()), "text_hits": int(text[rows].sum())}
    return out


def relevance(parsed: ParsedReasoning, task_text: str) -> float:
    """The report's relevance rule (reasoning_quality in bitmar_pipeline.evaluation.report)."""
    from bitmar_pipeline.evaluation.report import reasoning_quality  # the report imports this module

    return reasoning_quality(parsed, task_text, set())["relevance"]


def evaluation_contradictions(parsed: list[ParsedReasoning]) -> dict[str, int]:
    """Counts of texts breaking the contradiction rule (module docstring), and of selections not evaluated."""
    contradictions = not_evaluated = 0
    for p in parsed:
        block = p.sections.get("robot_evaluation", "")
        selected = [r for r in p.robots if r != NO_ROBOT]
        named = [r for r in selected if r.lower() in block.lower()]
        contradictions += bool(set(named) - robots_mentioned_positively(block))
        not_evaluated += len(named) < len(selected)
    return {"robot_evaluation_contradictions": contradictions, "selected_not_evaluated": not_evaluated}


def score_set(evaluation: ReasoningEvaluation, task_texts: list[str], n_resamples: int) -> dict[str, Any]:
    """Head top-1, text hit and relevance with CIs, per-robot hits and contradiction counts."""
    head, text = _head_hits(evaluation), _text_hits(evaluation)
    relevances = np.array([relevance(p, t) for p, t in zip(evaluation.parsed, task_texts, strict=True)])
    return {
        "n": evaluation.n,
        "no_robot_tasks": sum(NO_ROBOT in g for g in evaluation.gold),
        "head_top1": ci_dict(bootstrap_ci(np.mean, head, n_resamples=n_resamples)),
        "head_exact_set": ci_dict(evaluation.metrics["head_exact_set"]),
        "head_sample_f1": ci_dict(evaluation.metrics["head_sample_f1"]),
        "text_hit": ci_dict(bootstrap_ci(np.mean, text, n_resamples=n_resamples)),
        "relevance": ci_dict(bootstrap_ci(np.mean, relevances, n_resamples=n_resamples)),
        "per_robot": _per_robot(evaluation, head, text),
        **evaluation_contradictions(evaluation.parsed),
        "contradiction_rule": CONTRADICTION_RULE,
    }


def example_outcomes(evaluation: ReasoningEvaluation, task_texts: list[str]) -> list[dict[str, Any]]:
    """One row per task: the head's top pick and its probability, and the reasoning text's pick."""
    rows = []
    for i, task in enumerate(task_texts):
        pick = int(evaluation.head_probs[i].argmax())
        text_pick = ", ".join(evaluation.parsed[i].robots) or "(unparsed)"
        rows.append(
            {
                "task": task,
                "gold": ", ".join(evaluation.gold[i]),
                "head_pick": ROBOT_CLASSES[pick],
                "head_probability": round(float(evaluation.head_probs[i, pick]), 4),
                "head_right": ROBOT_CLASSES[pick] in evaluation.gold[i],
                "text_pick": text_pick,
                "text_right": bool(set(evaluation.parsed[i].robots) & set(evaluation.gold[i])),
            }
        )
    return rows


def _evaluate_set(
    model: BitMarModel,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    name: str,
    max_new_tokens: int,
    n_resamples: int,
    calibration: PlattCalibration | None,
    profiles: Profiles | None = None,
) -> tuple[ReasoningEvaluation, list[str]]:
    frame = _as_split(load_eval_set(path), name).drop_duplicates("task_key")
    evaluation = evaluate_reasoning(
        model, tokenizer, frame, name, max_new_tokens=max_new_tokens, n_resamples=n_resamples,
        guided=True, calibration=calibration, profiles=profiles,
    )
    return evaluation, frame["task_text"].tolist()


def user_phrased_section(
    model: BitMarModel,
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    n_resamples: int,
    user_set: Path = USER_PHRASED_FILE,
    readme_set: Path = README_EXAMPLES_FILE,
    user_validation_set: Path = USER_PHRASED_VALIDATION_FILE,
    calibration: PlattCalibration | None = None,
    profiles: Profiles | None = None,
) -> dict[str, Any]:
    """The report's `user_phrased` section: the robustness set, its validation twin and the README examples, with
    head-guided texts stating the (calibrated) head confidence and, with the fleet's `profiles`,
    each robot's reason from its own profile, as the release shows them."""
    user_eval, user_texts = _evaluate_set(
        model, tokenizer, user_set, "user_phrased", max_new_tokens, n_resamples, calibration, profiles
    )
    validation_eval, validation_texts = _evaluate_set(
        model, tokenizer, user_validation_set, "user_phrased_validation", max_new_tokens, n_resamples, calibration,
        profiles,
    )
    readme_eval, readme_texts = _evaluate_set(
        model, tokenizer, readme_set, "readme_examples", max_new_tokens, n_resamples, calibration, profiles
    )
    readme = score_set(readme_eval, readme_texts, n_resamples)
    examples = example_outcomes(readme_eval, readme_texts)
    return {
        "user_set": {"file": user_set.name, **score_set(user_eval, user_texts, n_resamples)},
        "user_validation_set": {
            "file": user_validation_set.name, **score_set(validation_eval, validation_texts, n_resamples)
        },
        "readme_examples": {
            "file": readme_set.name,
            "n": readme["n"],
            "head_hits": sum(e["head_right"] for e in examples),
            "text_hits": sum(e["text_right"] for e in examples),
            "robot_evaluation_contradictions": readme["robot_evaluation_contradictions"],
            "examples": examples,
        },
    }


def user_validation_use(knowledge: dict[str, Any]) -> str | None:
    """What the reasoning_sft stage's knowledge metadata says the user-phrased validation set chose
    (None: nothing), for the report: a score on tasks that chose a setting is not a held-out one."""
    uses = []
    if "user-phrased" in knowledge.get("knowledge_fit_chosen_on", ""):
        multiple = knowledge["knowledge_fit_multiple"]
        uses.append(f"the fleet fit's weight (multiple {multiple} of the fit margin's slope)")
    if "user-phrased" in knowledge.get("knowledge_no_robot_chosen_on", ""):
        uses.append(f"the no-robot gate's threshold ({knowledge['knowledge_no_robot_threshold']})")
    if not uses:
        return None
    return f"choosing {' and '.join(uses)}: a validation score, not a held-out one; never trained on"


def headline_metadata(section: dict[str, Any]) -> dict[str, float | int]:
    """The few numbers the evaluation_report asset shows in its metadata."""
    user, readme = section["user_set"], section["readme_examples"]
    return {
        "user_phrased_head_top1": user["head_top1"]["value"],
        "user_phrased_head_top1_ci95_low": user["head_top1"]["ci95_low"],
        "user_phrased_head_top1_ci95_high": user["head_top1"]["ci95_high"],
        "user_phrased_text_hit": user["text_hit"]["value"],
        "user_phrased_validation_head_top1": section["user_validation_set"]["head_top1"]["value"],
        "readme_examples_head_hits": readme["head_hits"],
        "readme_examples_text_hits": readme["text_hits"],
    }
