"""Robot selection quality of a model on one split: the selection head, and the selections
parsed from the reasoning text it generates (greedy decoding, so results are reproducible)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from bitmar_model.calibration import PlattCalibration
from bitmar_model.guided import HeadDecision, HeadGuidedDecoding, Profiles
from bitmar_model.metrics import (
    MetricWithCI,
    bootstrap_ci,
    exact_set_accuracy,
    label_matrix,
    sample_f1,
    top1_accuracy,
)
from bitmar_model.modeling import BitMarModel
from bitmar_model.reasoning_format import NO_ROBOT, ParsedReasoning, parse_reasoning
from bitmar_model.robots import ROBOT_CLASSES, ROBOT_INDEX, select_robots
from bitmar_pipeline.training.reasoning_targets import (
    format_prompt,
    profile_cues,
    profile_phrase_forms,
    task_cue_phrases,
    task_goal,
)


@dataclass
class ReasoningEvaluation:
    split: str
    n: int
    head_probs: np.ndarray  # [N, 6]
    head_selections: list[list[str]]
    texts: list[str]
    parsed: list[ParsedReasoning]
    gold: list[list[str]]
    metrics: dict[str, MetricWithCI]

    def summary(self) -> dict[str, float]:
        return {name: round(m.value, 4) for name, m in self.metrics.items()}

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {
                    "metric": k,
                    "value": round(m.value, 3),
                    "ci95_low": round(m.low, 3),
                    "ci95_high": round(m.high, 3),
                    "n": m.n,
                }
                for k, m in self.metrics.items()
            ]
        )


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of the tasks as prompts, right-padded and cut at `max_len`."""
    encoded = tokenizer(
        [format_prompt(t) for t in texts],
        add_special_tokens=False,
        truncation=True,
        max_length=max_len,
        padding=True,
        return_tensors="pt",
    )
    return encoded["input_ids"], encoded["attention_mask"]


@torch.no_grad()
def knowledge_vectors(model: BitMarModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> torch.Tensor:
    """[N, d] on the CPU: the model's task-knowledge vector of each text read as a prompt."""
    device = model.knowledge.classifier_bias.device
    ids, mask = encode_prompts(tokenizer, list(texts), model.config.max_seq_len)
    return model.knowledge.task_vectors(ids.to(device), mask.to(device)).float().cpu()


@torch.no_grad()
def profile_reasons(
    model: BitMarModel, tokenizer: PreTrainedTokenizerBase, tasks: Sequence[str], profiles: Profiles
) -> list[dict[str, str]]:
    """Per task, robot -> the capability or environment of its profile whose task-knowledge vector
    lies nearest the task's (cosine; the first phrase when the knowledge knows none of the task's
    words). Left to choose, the decoder (trained on 173 tasks) picked the phrase all-MiniLM-L6-v2
    ranks first 13% of the time; this picks it 71% of the time (docs/decisions.md)."""
    forms = {robot: pairs for robot, profile in profiles.items() if (pairs := profile_phrase_forms(profile))}
    texts = sorted({form for pairs in forms.values() for _, form in pairs})
    index = {text: i for i, text in enumerate(texts)}
    similarity = knowledge_vectors(model, tokenizer, tasks) @ knowledge_vectors(model, tokenizer, texts).T
    rows: list[dict[str, str]] = [{} for _ in tasks]
    for robot, pairs in forms.items():
        best = similarity[:, [index[form] for _, form in pairs]].argmax(dim=1)
        for row, i in zip(rows, best.tolist(), strict=True):
            row[robot] = pairs[i][0]
    return rows


def cued_by(
    task: str | None, robots: Sequence[str], profiles: Profiles | None, reasons: Mapping[str, str] | None = None
) -> bool | None:
    """"All cued by the task", the targets' rule (`profile_cues`): a word of the task names each selected
    robot's stated reason (its `reasons` entry), or with none stated, one of its capabilities or
    environments. None without the task or a selected robot's profile."""
    if task is None or not profiles or not all(robot in profiles for robot in robots):
        return None
    reasons = reasons or {}
    cues = {robot: [cue.strip() for cue in profile_cues(task, profiles[robot])] for robot in robots}
    return all(reasons[robot] in cues[robot] if robot in reasons else bool(cues[robot]) for robot in robots)


def head_guidance(
    tokenizer: PreTrainedTokenizerBase,
    head_probs: np.ndarray,
    calibration: PlattCalibration | None = None,
    profiles: Profiles | None = None,
    tasks: Sequence[str] | None = None,
    model: BitMarModel | None = None,
    robot_names: Sequence[str] = ROBOT_CLASSES,
    shown: Sequence[float] | None = None,
) -> HeadGuidedDecoding:
    """Guided decoding that states, per row, the head's selection and the probability shown for
    its top robot (calibrated when `calibration` is given); with the fleet's `profiles`, each
    robot's reason is one of its own profile phrases, and with the `model` (when it has task
    knowledge) and the rows' `tasks`, a selected robot's is the one `profile_reasons` ranks nearest
    the task; with the `tasks`, the "Cues:" line is one of the task's own phrases
    (`task_cue_phrases`) and the "Goal:" line is the task. `robot_names` names `head_probs`'
    columns ("No Robot" 6th; fleet robots scored zero-shot after it); `shown` overrides the stated
    confidences."""
    selected = select_robots(head_probs)
    if shown is None:
        top = head_probs.max(axis=1)
        shown = calibration(top) if calibration is not None else top
        if calibration is not None and model is not None and model.config.knowledge_no_robot_gate:
            # "No Robot" shows its no-robot gate's probability: no validation task calibrates it.
            shown = np.where(selected[:, ROBOT_INDEX[NO_ROBOT]], top, shown)
    cues = [task_cue_phrases(t) for t in tasks] if tasks is not None else [[] for _ in shown]
    goals = [task_goal(t) for t in tasks] if tasks is not None else [None for _ in shown]
    ranked: list[dict[str, str]] = [{} for _ in shown]
    if profiles and tasks is not None and model is not None and model.config.knowledge_dim:
        ranked = profile_reasons(model, tokenizer, tasks, profiles)
    decisions = []
    texts = tasks if tasks is not None else [None for _ in shown]
    rows = zip(selected, shown, cues, goals, ranked, texts, strict=True)
    for row, conf, row_cues, goal, reasons, task in rows:
        robots = [robot_names[i] for i in np.flatnonzero(row)]
        fits = {robot: reasons[robot] for robot in robots if robot in reasons}
        decisions.append(HeadDecision(robots, float(conf), row_cues, goal, fits, cued_by(task, robots, profiles, fits)))
    return HeadGuidedDecoding(
        decisions,
        encode=lambda text: tokenizer.encode(text, add_special_tokens=False),
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        eos_token_id=tokenizer.eos_token_id,
        profiles=profiles,
    )


@torch.no_grad()
def evaluate_reasoning(
    model: BitMarModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: pd.DataFrame,
    split: str,
    max_new_tokens: int = 200,
    batch_size: int = 32,
    generate: bool = True,
    n_resamples: int = 1000,
    guided: bool = False,
    calibration: PlattCalibration | None = None,
    profiles: Profiles | None = None,
) -> ReasoningEvaluation:
    """Evaluate on the tasks of `split` (one row per distinct task key; columns task_text, robots).

    guided: the text states the head's selection and its (calibrated) confidence
    (`head_guidance`); otherwise the decoder's text decides on its own."""
    rows = tasks[tasks["split"] == split].drop_duplicates("task_key")
    if rows.empty:
        raise ValueError(f"no robot tasks in split {split!r}")
    model.eval()
    device = next(model.parameters()).device
    probs, texts = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows.iloc[start : start + batch_size]
        ids, mask = encode_prompts(tokenizer, chunk["task_text"].tolist(), model.config.max_seq_len)
        ids, mask = ids.to(device), mask.to(device)
        probs.append(model(ids, mask).robot_probs.float().cpu().numpy())
        if generate:
            chunk_tasks = chunk["task_text"].tolist()
            guidance = None
            if guided:
                guidance = head_guidance(tokenizer, probs[-1], calibration, profiles, chunk_tasks, model)
            out = model.generate(ids, mask, max_new_tokens=max_new_tokens, logits_processor=guidance)
            tokens = out.new_tokens.masked_fill(out.new_token_mask == 0, tokenizer.pad_token_id)
            texts.extend(tokenizer.batch_decode(tokens.cpu(), skip_special_tokens=True))
    head_probs = np.concatenate(probs)
    gold = [list(r) for r in rows["robots"]]
    gold_matrix = label_matrix(gold)
    head_pred = select_robots(head_probs)
    metrics = {
        "head_top1": bootstrap_ci(top1_accuracy, head_probs, gold_matrix, n_resamples=n_resamples),
        "head_exact_set": bootstrap_ci(exact_set_accuracy, head_pred, gold_matrix, n_resamples=n_resamples),
        "head_sample_f1": bootstrap_ci(sample_f1, head_pred, gold_matrix, n_resamples=n_resamples),
    }
    parsed = [parse_reasoning(t) for t in texts]
    if generate:
        well_formed = np.array([p.well_formed for p in parsed], dtype=float)
        parsed_pred = label_matrix([p.robots for p in parsed])
        # parsed_hit: at least one selected robot is gold. A text whose selection cannot be
        # parsed counts as wrong, never as skipped.
        parsed_hit = np.array([bool(set(p.robots) & set(g)) for p, g in zip(parsed, gold, strict=True)], dtype=float)
        metrics.update(
            {
                "reasoning_well_formed": bootstrap_ci(np.mean, well_formed, n_resamples=n_resamples),
                "parsed_hit": bootstrap_ci(np.mean, parsed_hit, n_resamples=n_resamples),
                "parsed_exact_set": bootstrap_ci(exact_set_accuracy, parsed_pred, gold_matrix, n_resamples=n_resamples),
                "parsed_sample_f1": bootstrap_ci(sample_f1, parsed_pred, gold_matrix, n_resamples=n_resamples),
            }
        )
    head_selections = [[ROBOT_CLASSES[i] for i in np.flatnonzero(row)] for row in head_pred]
    return ReasoningEvaluation(split, len(rows), head_probs, head_selections, texts, parsed, gold, metrics)
