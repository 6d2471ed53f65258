"""Text-only robot-selection baselines, the floor a BitMar model has to beat.

Both baselines share one interface: `fit(texts, gold_sets)`, `predict_proba(texts)` ->
[N, 6] scores in `ROBOT_CLASSES` order, `predict(texts)` -> binary [N, 6]. Both are
deterministic: same training data, same predictions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from bitmar_model.metrics import (
    bootstrap_ci,
    exact_set_accuracy,
    label_matrix,
    per_class_precision_recall,
    sample_f1,
    top1_accuracy,
)
from bitmar_model.robots import NUM_ROBOT_CLASSES, select_robots

GoldSets = Sequence[Collection[str]]


class MajorityBaseline:
    """Predicts the most frequent training label set for every task.

    `predict_proba` is the fraction of training tasks that include each robot, so its
    argmax (the top-1 pick) is the most frequent single robot, which can differ from the
    best single robot inside the majority set. Count ties go to the lower class index
    (robots) or the first set in `ROBOT_CLASSES` order (sets), so fitting is order-free.
    """

    def __init__(self) -> None:
        self.label_set_: np.ndarray | None = None
        self.robot_rates_: np.ndarray | None = None

    def fit(self, texts: Sequence[str], gold_sets: GoldSets) -> MajorityBaseline:
        gold = label_matrix(gold_sets)
        if len(gold) == 0 or len(gold) != len(texts):
            raise ValueError(
                f"need equal, non-zero numbers of texts and labels, got {len(texts)} and {len(gold)}"
            )
        counts = Counter(tuple(row) for row in gold.astype(int).tolist())
        # Highest count first; among equals the lexicographically largest 0/1 tuple, i.e.
        # the set whose first robot comes earliest in ROBOT_CLASSES.
        best = max(counts.items(), key=lambda item: (item[1], item[0]))[0]
        self.label_set_ = np.array(best, dtype=bool)
        self.robot_rates_ = gold.mean(axis=0)
        return self

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        rates = _fitted(self.robot_rates_)
        return np.tile(rates, (len(texts), 1))

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        return np.tile(_fitted(self.label_set_), (len(texts), 1)).astype(np.int64)


class TfidfLogisticBaseline:
    """TF-IDF (word 1-2 grams) + one-vs-rest logistic regression (class_weight="balanced").

    One binary classifier per robot class. A class whose training column is constant
    (e.g. "No Robot" never occurs in the public data) gets that constant as its
    probability instead of a classifier, which could not be fitted on one label.
    `predict` applies the head's rule (`select_robots`): robots with probability >=
    `threshold` and always the best one, or "No Robot" alone when it beats the best robot.
    """

    def __init__(self, threshold: float = 0.5, c: float = 1.0, seed: int = 0) -> None:
        self.threshold = threshold
        self.c = c
        self.seed = seed
        self.vectorizer_: TfidfVectorizer | None = None
        self.classifiers_: dict[int, LogisticRegression] = {}
        self.constant_: dict[int, float] = {}

    def fit(self, texts: Sequence[str], gold_sets: GoldSets) -> TfidfLogisticBaseline:
        gold = label_matrix(gold_sets)
        if len(gold) == 0 or len(gold) != len(texts):
            raise ValueError(
                f"need equal, non-zero numbers of texts and labels, got {len(texts)} and {len(gold)}"
            )
        self.vectorizer_ = TfidfVectorizer(ngram_range=(1, 2), lowercase=True)
        features = self.vectorizer_.fit_transform(list(texts))
        self.classifiers_, self.constant_ = {}, {}
        for k in range(NUM_ROBOT_CLASSES):
            column = gold[:, k]
            if column.all() or not column.any():
                self.constant_[k] = float(column[0])
                continue
            clf = LogisticRegression(
                C=self.c, class_weight="balanced", max_iter=1000, random_state=self.seed
            )
            self.classifiers_[k] = clf.fit(features, column.astype(np.int64))
        return self

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        features = _fitted(self.vectorizer_).transform(list(texts))
        probs = np.zeros((len(texts), NUM_ROBOT_CLASSES))
        for k, clf in self.classifiers_.items():
            probs[:, k] = clf.predict_proba(features)[:, 1]
        for k, value in self.constant_.items():
            probs[:, k] = value
        return probs

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        return select_robots(self.predict_proba(texts), self.threshold).astype(np.int64)


def _fitted(value: Any) -> Any:
    if value is None:
        raise RuntimeError("call fit() before predicting")
    return value


def evaluate_selection(
    probs: np.ndarray,
    pred: np.ndarray,
    gold_sets: GoldSets | np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Top-1, exact-set and sample-F1 accuracy with 95% percentile-bootstrap intervals
    (`MetricWithCI`, resampling tasks), plus per-class precision/recall/F1/support."""
    gold = label_matrix(
        gold_sets
    )  # a matrix once, so resamples index rows instead of re-parsing names
    pred = label_matrix(np.asarray(pred))
    return {
        "top1": bootstrap_ci(top1_accuracy, probs, gold, n_resamples=n_resamples, seed=seed),
        "exact_set": bootstrap_ci(
            exact_set_accuracy, pred, gold, n_resamples=n_resamples, seed=seed
        ),
        "sample_f1": bootstrap_ci(sample_f1, pred, gold, n_resamples=n_resamples, seed=seed),
        "per_class": per_class_precision_recall(pred, gold),
    }
