"""Evaluation metrics: robot selection, bootstrap intervals, calibration, retrieval, captions.

Inputs are numpy arrays (or lists of robot-name collections); outputs are plain floats,
dicts and small named tuples, so results go straight into JSON reports and Dagster
metadata. Robot labels are columns in `ROBOT_CLASSES` order; names are mapped through
`normalize_robot_name` and an unknown name raises rather than being dropped.

Caption metrics tokenise with `tokenize_caption` (lowercase, word tokens; see there).
BLEU-4 is computed by sacrebleu on those tokens; CIDEr-D is implemented here after the
coco-caption reference code, because no maintained pure-Python package provides it
(pycocoevalcap ships Java tools and ~100 MB of jars).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple

import numpy as np
from sacrebleu.metrics import BLEU

from bitmar_model.robots import NUM_ROBOT_CLASSES, ROBOT_CLASSES, normalize_robot_name

LabelInput = np.ndarray | Sequence[Collection[str]]


# --- robot selection (multi-label) -------------------------------------------------------


def label_matrix(labels: LabelInput) -> np.ndarray:
    """Binary [N, 6] bool matrix from a [N, 6] 0/1 array or from N collections of robot names."""
    if isinstance(labels, np.ndarray) and labels.ndim == 2 and labels.dtype != object:
        if labels.shape[1] != NUM_ROBOT_CLASSES:
            raise ValueError(
                f"label matrix must have {NUM_ROBOT_CLASSES} columns, got {labels.shape}"
            )
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("label matrix must contain only 0/1 values")
        return labels.astype(bool)
    matrix = np.zeros((len(labels), NUM_ROBOT_CLASSES), dtype=bool)
    for row, names in enumerate(labels):
        if isinstance(names, str):
            raise TypeError(
                f"row {row}: expected a collection of robot names, got the string {names!r}"
            )
        for name in names:
            canonical = normalize_robot_name(name)
            if canonical is None:
                raise ValueError(f"row {row}: unknown robot name {name!r}")
            matrix[row, ROBOT_CLASSES.index(canonical)] = True
    return matrix


def _probability_matrix(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != NUM_ROBOT_CLASSES:
        raise ValueError(f"probabilities must be [N, {NUM_ROBOT_CLASSES}], got {probs.shape}")
    return probs


def _paired(pred: LabelInput, gold: LabelInput) -> tuple[np.ndarray, np.ndarray]:
    pred_m, gold_m = label_matrix(pred), label_matrix(gold)
    if pred_m.shape != gold_m.shape:
        raise ValueError(f"pred {pred_m.shape} and gold {gold_m.shape} differ in shape")
    if len(gold_m) == 0:
        raise ValueError("no samples to evaluate")
    return pred_m, gold_m


def top1_accuracy(probs: np.ndarray, gold: LabelInput) -> float:
    """Fraction of samples whose highest-probability robot is one of the gold robots.

    Ties in `probs` go to the lowest class index (numpy argmax), so the value is deterministic.
    """
    probs = _probability_matrix(probs)
    gold_m = label_matrix(gold)
    if len(probs) != len(gold_m) or len(gold_m) == 0:
        raise ValueError(f"need equal, non-zero sample counts, got {len(probs)} and {len(gold_m)}")
    top = probs.argmax(axis=1)
    return float(gold_m[np.arange(len(gold_m)), top].mean())


def exact_set_accuracy(pred: LabelInput, gold: LabelInput) -> float:
    """Fraction of samples whose predicted robot set equals the gold set exactly."""
    pred_m, gold_m = _paired(pred, gold)
    return float((pred_m == gold_m).all(axis=1).mean())


def sample_f1(pred: LabelInput, gold: LabelInput) -> float:
    """Mean over samples of F1 = 2|P ∩ G| / (|P| + |G|); a sample with P and G both empty scores 1."""
    pred_m, gold_m = _paired(pred, gold)
    overlap = (pred_m & gold_m).sum(axis=1)
    sizes = pred_m.sum(axis=1) + gold_m.sum(axis=1)
    per_sample = np.where(sizes == 0, 1.0, 2.0 * overlap / np.maximum(sizes, 1))
    return float(per_sample.mean())


def per_class_precision_recall(pred: LabelInput, gold: LabelInput) -> dict[str, dict[str, float]]:
    """Per robot class: precision TP/(TP+FP), recall TP/(TP+FN), their F1, and support (#gold).

    A ratio with a zero denominator is 0.0 (sklearn's zero_division=0), so a class that is
    never predicted has precision 0 and a class absent from gold has recall 0.
    """
    pred_m, gold_m = _paired(pred, gold)
    tp = (pred_m & gold_m).sum(axis=0)
    fp = (pred_m & ~gold_m).sum(axis=0)
    fn = (~pred_m & gold_m).sum(axis=0)
    report: dict[str, dict[str, float]] = {}
    for i, name in enumerate(ROBOT_CLASSES):
        precision = _ratio(tp[i], tp[i] + fp[i])
        recall = _ratio(tp[i], tp[i] + fn[i])
        report[name] = {
            "precision": precision,
            "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall),
            "support": float(tp[i] + fn[i]),
        }
    return report


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def jaccard(pred_set: Collection[str], gold_set: Collection[str]) -> float:
    """|P ∩ G| / |P ∪ G| of two robot-name sets (names normalised); both empty scores 1."""
    pred_m = label_matrix([pred_set])[0]
    gold_m = label_matrix([gold_set])[0]
    union = int((pred_m | gold_m).sum())
    return 1.0 if union == 0 else float((pred_m & gold_m).sum()) / union


# --- bootstrap confidence intervals ------------------------------------------------------


class MetricWithCI(NamedTuple):
    """A metric on the full sample with its percentile-bootstrap interval and sample size."""

    value: float
    low: float
    high: float
    n: int


def ci_dict(metric: MetricWithCI) -> dict[str, float]:
    """The metric as a report entry: value and interval rounded to 4 digits, and n."""
    return {
        "value": round(metric.value, 4),
        "ci95_low": round(metric.low, 4),
        "ci95_high": round(metric.high, 4),
        "n": metric.n,
    }


def bootstrap_ci(
    metric_fn: Callable[..., float],
    *arrays: Any,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> MetricWithCI:
    """Percentile bootstrap: resample items (rows of all `arrays` jointly) with replacement.

    `value` is `metric_fn(*arrays)` on the full data; `low`/`high` are the alpha/2 and
    1 - alpha/2 quantiles of the metric over `n_resamples` resamples. All resample indices
    come from one `numpy.random.default_rng(seed)` draw, so a seed gives the same interval.
    Lists (e.g. of gold robot sets) are indexed item-wise like arrays.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    items = [_indexable(a) for a in arrays]
    n = len(items[0])
    if n == 0 or any(len(a) != n for a in items):
        raise ValueError(f"arrays must share a non-zero length, got {[len(a) for a in items]}")
    value = float(metric_fn(*arrays))
    indices = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    stats = np.fromiter(
        (metric_fn(*(a[idx] for a in items)) for idx in indices),
        dtype=np.float64,
        count=n_resamples,
    )
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return MetricWithCI(value=value, low=float(low), high=float(high), n=n)


def _indexable(values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    # An object array keeps each item (a set, a list of names) whole under fancy indexing.
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


# --- calibration -------------------------------------------------------------------------

# What a stated confidence is a probability of, for the GRPO calibration reward and the
# reported ECE alike: "confidence that this selection is right" means the whole set.
CONFIDENCE_TARGET = "exact-set correctness"


def confidence_target(selected: Collection[str], gold: Collection[str]) -> float:
    """1.0 when the selected robots are exactly the gold set, else 0.0 (an empty selection
    is never right)."""
    return float(bool(selected) and set(selected) == set(gold))



class ReliabilityBin(NamedTuple):
    bin_low: float
    bin_high: float
    mean_conf: float
    accuracy: float
    count: int


def reliability_bins(
    confidences: np.ndarray, correct: np.ndarray, n_bins: int = 10
) -> list[ReliabilityBin]:
    """Equal-width confidence bins over [0, 1]; only non-empty bins are returned.

    Bin i covers [i/n_bins, (i+1)/n_bins), the last bin also includes 1.0. Per bin:
    mean confidence, accuracy (mean of `correct`) and the number of samples.
    """
    conf = np.asarray(confidences, dtype=np.float64).ravel()
    hits = np.asarray(correct, dtype=np.float64).ravel()
    if conf.shape != hits.shape or conf.size == 0:
        raise ValueError(f"need equal, non-zero lengths, got {conf.shape} and {hits.shape}")
    if ((conf < 0) | (conf > 1)).any():
        raise ValueError("confidences must lie in [0, 1]")
    which = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    bins = []
    for b in range(n_bins):
        mask = which == b
        count = int(mask.sum())
        if count:
            bins.append(
                ReliabilityBin(
                    b / n_bins,
                    (b + 1) / n_bins,
                    float(conf[mask].mean()),
                    float(hits[mask].mean()),
                    count,
                )
            )
    return bins


def expected_calibration_error(
    confidences: np.ndarray, correct: np.ndarray, n_bins: int = 10
) -> float:
    """ECE = sum over bins of (count_b / N) * |accuracy_b - mean_conf_b| (bins of `reliability_bins`)."""
    bins = reliability_bins(confidences, correct, n_bins)
    total = sum(b.count for b in bins)
    return float(sum(b.count / total * abs(b.accuracy - b.mean_conf) for b in bins))


# --- retrieval ---------------------------------------------------------------------------

_RETRIEVAL_CHUNK = 1024  # rows of the similarity matrix held at once (bounded memory at COCO scale)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _text_owner(n_images: int, n_texts: int, text_to_image_index: np.ndarray | None) -> np.ndarray:
    if text_to_image_index is None:
        if n_images != n_texts:
            raise ValueError("without text_to_image_index, image and text counts must match")
        return np.arange(n_texts)
    owner = np.asarray(text_to_image_index, dtype=np.int64)
    if owner.shape != (n_texts,) or owner.min(initial=0) < 0 or owner.max(initial=0) >= n_images:
        raise ValueError("text_to_image_index must map every text row to a valid image row")
    return owner


def retrieval_recall_at_k(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    text_to_image_index: np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@k of cosine-similarity retrieval in both directions.

    - "i2t_R@k": fraction of images (that own at least one text) with one of their own
      texts among the k most similar texts;
    - "t2i_R@k": fraction of texts whose own image is among the k most similar images.
    `text_to_image_index[t]` is the image row of text row t (default: row t, one text per
    image). Rank = number of non-matching candidates scoring >= the best match, so ties
    count against the model (collapsed embeddings score low, not perfect).
    """
    images, texts = _unit_rows(image_emb), _unit_rows(text_emb)
    owner = _text_owner(len(images), len(texts), text_to_image_index)
    image_has_text = np.bincount(owner, minlength=len(images)) > 0

    i2t_rank = np.empty(len(images), dtype=np.int64)
    for start in range(0, len(images), _RETRIEVAL_CHUNK):
        sims = images[start : start + _RETRIEVAL_CHUNK] @ texts.T
        own = owner[None, :] == np.arange(start, start + len(sims))[:, None]
        best_own = np.where(own, sims, -np.inf).max(axis=1, keepdims=True)
        i2t_rank[start : start + len(sims)] = ((sims >= best_own) & ~own).sum(axis=1)
    i2t_rank = i2t_rank[image_has_text]

    t2i_rank = np.empty(len(texts), dtype=np.int64)
    for start in range(0, len(texts), _RETRIEVAL_CHUNK):
        sims = texts[start : start + _RETRIEVAL_CHUNK] @ images.T
        rows = np.arange(len(sims))
        true = sims[rows, owner[start : start + len(sims)]][:, None]
        t2i_rank[start : start + len(sims)] = (sims >= true).sum(
            axis=1
        ) - 1  # minus the match itself

    result: dict[str, float] = {}
    for k in ks:
        result[f"i2t_R@{k}"] = float((i2t_rank < k).mean())
        result[f"t2i_R@{k}"] = float((t2i_rank < k).mean())
    return result


def matched_vs_random_cosine(
    image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray, seed: int = 0
) -> dict[str, float]:
    """Mean cosine of each text with its own image ("matched"), with one uniformly drawn
    other image ("random", seeded), and their difference ("gap" = matched - random)."""
    images, texts = _unit_rows(image_emb), _unit_rows(text_emb)
    if len(images) < 2:
        raise ValueError("need at least two images to draw a non-matching one")
    owner = _text_owner(len(images), len(texts), text_to_image)
    other = np.random.default_rng(seed).integers(0, len(images) - 1, size=len(texts))
    other += other >= owner  # skip the text's own image, keeping the draw uniform over the rest
    matched = float(np.einsum("td,td->t", texts, images[owner]).mean())
    random = float(np.einsum("td,td->t", texts, images[other]).mean())
    return {"matched": matched, "random": random, "gap": matched - random}


# --- captions ----------------------------------------------------------------------------

_WORD = re.compile(r"\w+(?:[-'’]\w+)*")


def tokenize_caption(text: str) -> list[str]:
    """Lowercase, then word tokens (letters/digits/underscore, keeping inner hyphens and
    apostrophes: "T-shirt", "man's"); all other punctuation is dropped.

    This approximates coco-caption's PTB tokenizer (which also drops punctuation) without
    Java, so scores are comparable to but not bit-identical with coco-caption's.
    """
    return _WORD.findall(text.lower())


def _check_caption_corpus(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> None:
    if len(references) != len(hypotheses) or not hypotheses:
        raise ValueError(
            f"need one reference list per hypothesis, got {len(references)} and {len(hypotheses)}"
        )
    if any(not refs for refs in references):
        raise ValueError("every hypothesis needs at least one reference")


def bleu4(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> float:
    """Corpus BLEU-4 in [0, 1] (Papineni et al. 2002), as coco-caption reports it.

    Geometric mean of clipped n-gram precisions (n = 1..4, uniform weights) pooled over the
    corpus, times the brevity penalty exp(1 - r/c) when c < r, where c is the total
    hypothesis length and r the sum of the closest reference lengths (ties: shorter). No
    smoothing: a corpus without any matching 4-gram scores 0. Text goes through
    `tokenize_caption`; sacrebleu does the counting (tokenize="none").
    """
    _check_caption_corpus(references, hypotheses)
    hyps = [" ".join(tokenize_caption(h)) for h in hypotheses]
    tokenized = [[" ".join(tokenize_caption(r)) for r in refs] for refs in references]
    if any(not any(refs) for refs in tokenized):
        raise ValueError("every hypothesis needs at least one non-empty reference")
    width = max(len(refs) for refs in tokenized)
    # sacrebleu wants reference streams (one per reference position); None marks a missing one.
    streams = [
        [refs[j] if j < len(refs) and refs[j] else None for refs in tokenized] for j in range(width)
    ]
    scorer = BLEU(tokenize="none", smooth_method="none", max_ngram_order=4, effective_order=False)
    return scorer.corpus_score(hyps, streams).score / 100.0


def _ngram_counts(tokens: list[str], max_n: int = 4) -> list[Counter[tuple[str, ...]]]:
    return [
        Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        for n in range(1, max_n + 1)
    ]


def cider_d_scores(
    references: Sequence[Sequence[str]], hypotheses: Sequence[str], sigma: float = 6.0
) -> np.ndarray:
    """Per-item CIDEr-D (Vedantam et al. 2015) as in coco-caption's CiderScorer.

    For item i with hypothesis h and references R_i, n = 1..4:
    - g_n(s) = tf-idf vector of the n-grams of s: raw count * (log N - log max(1, df)),
      where N = number of items and df = number of items whose references contain the
      n-gram (IDF from the evaluated corpus' references only);
    - sim_n(h, r) = sum_k min(g_n(h)_k, g_n(r)_k) * g_n(r)_k / (|g_n(h)| |g_n(r)|)
      (0 if a norm is 0; the min clips repeated n-grams) * exp(-(len h - len r)^2 / (2 sigma^2));
    - CIDEr-D_i = 10 * mean_n mean_{r in R_i} sim_n(h, r).
    Lengths are token counts after `tokenize_caption`.
    """
    _check_caption_corpus(references, hypotheses)
    hyp_tokens = [tokenize_caption(h) for h in hypotheses]
    ref_tokens = [[tokenize_caption(r) for r in refs] for refs in references]
    hyp_grams = [_ngram_counts(t) for t in hyp_tokens]
    ref_grams = [[_ngram_counts(t) for t in refs] for refs in ref_tokens]

    doc_freq: Counter[tuple[str, ...]] = Counter()
    for refs in ref_grams:
        doc_freq.update({g for grams in refs for order in grams for g in order})
    log_n = math.log(len(hypotheses))

    def tfidf(
        grams: list[Counter[tuple[str, ...]]],
    ) -> list[tuple[dict[tuple[str, ...], float], float]]:
        vectors = []
        for order in grams:
            vec = {g: c * (log_n - math.log(max(1.0, doc_freq[g]))) for g, c in order.items()}
            vectors.append((vec, math.sqrt(sum(v * v for v in vec.values()))))
        return vectors

    scores = np.zeros(len(hypotheses))
    for i, (h_tokens, h_grams) in enumerate(zip(hyp_tokens, hyp_grams, strict=True)):
        h_vecs = tfidf(h_grams)
        total = 0.0
        for r_tokens, r_grams in zip(ref_tokens[i], ref_grams[i], strict=True):
            penalty = math.exp(-((len(h_tokens) - len(r_tokens)) ** 2) / (2 * sigma**2))
            for (h_vec, h_norm), (r_vec, r_norm) in zip(h_vecs, tfidf(r_grams), strict=True):
                if h_norm and r_norm:
                    dot = sum(
                        min(v, r_vec.get(g, 0.0)) * r_vec.get(g, 0.0) for g, v in h_vec.items()
                    )
                    total += penalty * dot / (h_norm * r_norm)
        scores[i] = 10.0 * total / (len(h_vecs) * len(ref_grams[i]))
    return scores


def cider_d(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> float:
    """Corpus CIDEr-D: the mean of `cider_d_scores` over items (sigma = 6, x10 scale)."""
    return float(cider_d_scores(references, hypotheses).mean())


# --- language modelling ------------------------------------------------------------------


def perplexity(total_nll: float, total_tokens: int) -> float:
    """exp(total_nll / total_tokens): total_nll is the summed natural-log negative
    log-likelihood over `total_tokens` predicted tokens."""
    if total_tokens <= 0:
        raise ValueError(f"total_tokens must be positive, got {total_tokens}")
    return math.exp(total_nll / total_tokens)
