"""Robots described only in the fleet, selected zero-shot (issue 12, item 1).

The selection head and the knowledge classifier have one column per robot the data labels. A
robot a user describes only by its profile (the config's `robots:` section, or `bitmar predict
--fleet`) has no column and no training task; the model can still score it, by how well the task
matches its capabilities and environments next to the rest of the fleet (`fleet_fit_scores` over
the model's own task-knowledge vectors; the release never needs the teacher), and a logistic map
fitted on validation turns that score into a probability:

    p_r(x) = sigmoid(scale * score_r(x) + bias),

fitted on the (score, is-gold) pairs of the trained robots on the validation tasks, the only
robots whose truth is known. The same map then serves a robot none of those tasks names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from transformers import PreTrainedTokenizerBase

from bitmar_model.guided import Profiles
from bitmar_model.knowledge import fleet_fit_scores
from bitmar_model.modeling import BitMarModel
from bitmar_pipeline.evaluation.selection_quality import knowledge_vectors
from bitmar_pipeline.training.reasoning_targets import profile_phrase_forms

TOP_K = 2  # phrases averaged per robot: a task rarely matches more than two of a profile's items
ZERO_SHOT_C = 100.0


@dataclass(frozen=True)
class ZeroShotCalibration:
    scale: float
    bias: float
    top_k: int = TOP_K

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.scale * np.asarray(scores, dtype=np.float64) + self.bias)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ZeroShotCalibration:
        return cls(float(data["scale"]), float(data["bias"]), int(data.get("top_k", TOP_K)))


def fleet_scores(
    model: BitMarModel, tokenizer: PreTrainedTokenizerBase, tasks: Sequence[str], profiles: Profiles, top_k: int = TOP_K
) -> np.ndarray:
    """[tasks, robots] `fleet_fit_scores` of each task against each robot of `profiles`, in its order."""
    owners, phrases = [], []
    for robot, profile in enumerate(profiles.values()):
        forms = [form for _, form in profile_phrase_forms(profile)]
        owners += [robot] * len(forms)
        phrases += forms
    scores = fleet_fit_scores(
        knowledge_vectors(model, tokenizer, tasks), knowledge_vectors(model, tokenizer, phrases),
        torch.tensor(owners), len(profiles), top_k,
    )
    return scores.numpy().astype(np.float64)


def fit_zero_shot(
    model: BitMarModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    robots: Sequence[Sequence[str]],
    profiles: Profiles,
) -> tuple[ZeroShotCalibration, int]:
    """The map from fit score to probability, fitted on these (validation) tasks' gold robots over
    the fleet `profiles` (all trained robots); also the number of (task, robot) pairs it saw."""
    if not tasks:
        raise ValueError("fit_zero_shot: no validation tasks to fit the zero-shot map on")
    scores = fleet_scores(model, tokenizer, tasks, profiles)
    gold = np.array([[name in row for name in profiles] for row in robots], dtype=int)
    return fit_score_map(scores, gold), int(gold.size)


def fit_score_map(scores: np.ndarray, gold: np.ndarray) -> ZeroShotCalibration:
    """The logistic map from fit scores [tasks, robots] to the chance that each robot is gold."""
    if gold.min() == gold.max():
        raise ValueError("fit score map: the validation tasks need both selected and unselected robots")
    # Two parameters on ~200 pairs need no shrinkage, and the scores span only ~+-0.2: at C 1 the
    # penalty flattened the slope so far that no held-out robot reached 0.5 (docs/decisions.md).
    fit = LogisticRegression(C=ZERO_SHOT_C).fit(np.reshape(scores, (-1, 1)), np.reshape(gold, -1))
    return ZeroShotCalibration(float(fit.coef_[0, 0]), float(fit.intercept_[0]))


@torch.no_grad()
def unknown_phrases(
    model: BitMarModel, tokenizer: PreTrainedTokenizerBase, profile: Mapping[str, Sequence[str]]
) -> list[str]:
    """The capabilities and environments of a profile of which the knowledge's word table knows no
    word: read as "a task that needs <phrase>", such a phrase is the template alone, and every robot
    described that way would score alike. Empty for a token table (every token has a row)."""
    knowledge = model.knowledge
    if not knowledge.words:
        return []
    phrases = [phrase for phrase, _ in profile_phrase_forms(profile)]
    encoded = tokenizer(phrases, add_special_tokens=False, padding=True, return_tensors="pt")
    device = knowledge.classifier_bias.device
    _, found = knowledge.word_rows_of(encoded["input_ids"].to(device), encoded["attention_mask"].to(device))
    return [phrase for phrase, known in zip(phrases, found.any(dim=1).tolist(), strict=True) if not known]
