"""Metrics against hand-computed values, known properties and a coco-caption cross-check."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from bitmar_model.metrics import (
    MetricWithCI,
    bleu4,
    bootstrap_ci,
    cider_d,
    cider_d_scores,
    exact_set_accuracy,
    expected_calibration_error,
    jaccard,
    label_matrix,
    matched_vs_random_cosine,
    per_class_precision_recall,
    perplexity,
    reliability_bins,
    retrieval_recall_at_k,
    sample_f1,
    tokenize_caption,
    top1_accuracy,
)
from bitmar_model.robots import ROBOT_CLASSES

GOLD = [{"Drone"}, {"Drone", "Robot with Legs"}, {"Underwater Robot"}, set()]
PRED = np.array(
    [
        [1, 0, 0, 0, 0, 0],  # exact
        [1, 0, 0, 0, 0, 0],  # half of the gold set
        [0, 0, 1, 0, 0, 0],  # wrong robot
        [0, 0, 0, 0, 0, 0],  # empty vs empty
    ]
)


def test_label_matrix_accepts_names_aliases_and_matrices() -> None:
    m = label_matrix([["drone", "legged robot"], []])
    assert m.tolist() == [[True, False, False, False, True, False], [False] * 6]
    assert (label_matrix(m.astype(int)) == m).all()
    with pytest.raises(ValueError, match="unknown robot"):
        label_matrix([["Submarine"]])
    with pytest.raises(ValueError, match="0/1"):
        label_matrix(np.full((1, 6), 0.7))


def test_selection_metrics_by_hand() -> None:
    probs = np.array(
        [
            [0.9, 0.1, 0, 0, 0, 0],
            [0.2, 0, 0, 0, 0.8, 0],  # Legs is gold
            [0, 0.3, 0.7, 0, 0, 0],  # Humanoid is not gold
            [0, 0, 0, 0, 0, 1.0],  # gold empty: never a hit
        ]
    )
    assert top1_accuracy(probs, GOLD) == pytest.approx(0.5)
    assert exact_set_accuracy(PRED, GOLD) == pytest.approx(0.5)
    # per sample F1: 1, 2*1/(1+2), 0, 1 (empty vs empty)
    assert sample_f1(PRED, GOLD) == pytest.approx((1 + 2 / 3 + 0 + 1) / 4)

    report = per_class_precision_recall(PRED, GOLD)
    assert list(report) == list(ROBOT_CLASSES)
    assert report["Drone"] == pytest.approx(
        {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    )
    assert report["Robot with Legs"] == pytest.approx(
        {"precision": 0, "recall": 0, "f1": 0, "support": 1}
    )
    assert report["Humanoid"]["precision"] == 0.0  # one false positive
    assert report["Underwater Robot"]["recall"] == 0.0


def test_jaccard() -> None:
    assert jaccard({"Drone", "Humanoid"}, {"drone", "Robot with Legs"}) == pytest.approx(1 / 3)
    assert jaccard(set(), set()) == 1.0
    assert jaccard({"Drone"}, set()) == 0.0


def test_bootstrap_ci_is_deterministic_contains_value_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(1)
    probs = rng.random((400, 6))
    gold = label_matrix([{ROBOT_CLASSES[i]} for i in rng.integers(0, 6, 400)])
    a = bootstrap_ci(top1_accuracy, probs, gold, seed=3)
    b = bootstrap_ci(top1_accuracy, probs, gold, seed=3)
    assert isinstance(a, MetricWithCI) and a == b and a.n == 400
    assert a.low <= a.value <= a.high
    small = bootstrap_ci(top1_accuracy, probs[:40], gold[:40], seed=3)
    assert small.high - small.low > a.high - a.low
    # a list of sets is resampled item-wise, like the matrix
    as_sets = [{ROBOT_CLASSES[j] for j in np.flatnonzero(row)} for row in gold[:40]]
    assert bootstrap_ci(top1_accuracy, probs[:40], as_sets, seed=3) == small


def test_bootstrap_ci_matches_normal_approximation_for_a_mean() -> None:
    hits = (np.random.default_rng(0).random(2000) < 0.3).astype(float)
    ci = bootstrap_ci(lambda x: float(x.mean()), hits, n_resamples=2000)
    half = 1.96 * math.sqrt(hits.mean() * (1 - hits.mean()) / len(hits))
    assert ci.high - ci.low == pytest.approx(2 * half, rel=0.1)


def test_bootstrap_ci_at_5000_items() -> None:
    # How long this takes is measured by benchmarks/speed.py, not asserted here.
    rng = np.random.default_rng(0)
    probs = rng.random((5000, 6))
    gold = rng.random((5000, 6)) < 0.3
    ci = bootstrap_ci(sample_f1, probs > 0.5, gold)
    assert ci.low <= ci.value <= ci.high and ci.n == 5000


def test_calibration_by_hand() -> None:
    conf = np.array([0.05, 0.15, 0.95, 0.95, 1.0])
    correct = np.array([0, 0, 1, 0, 1])
    bins = reliability_bins(conf, correct, n_bins=10)
    assert [(b.bin_low, b.count) for b in bins] == [(0.0, 1), (0.1, 1), (0.9, 3)]
    assert bins[2].mean_conf == pytest.approx((0.95 + 0.95 + 1.0) / 3)
    assert bins[2].accuracy == pytest.approx(2 / 3)
    expected = (0.05 + 0.15 + 3 * abs(2 / 3 - (2.9 / 3))) / 5
    assert expected_calibration_error(conf, correct) == pytest.approx(expected)
    assert expected_calibration_error(
        np.array([0.8, 0.8, 0.8, 0.8, 0.8]), np.array([1, 1, 1, 1, 0])
    ) == pytest.approx(0)


def test_retrieval_with_several_texts_per_image() -> None:
    images = np.eye(4, 8)
    # texts 0,1 -> image 0; text 2 -> image 1 (but points at image 2); text 3 -> image 3
    texts = np.stack([images[0], images[0] + 0.1, images[2], images[3]])
    owner = np.array([0, 0, 1, 3])
    r = retrieval_recall_at_k(images, texts, ks=(1, 2), text_to_image_index=owner)
    # t2i: text 2 ranks its image behind image 2 and ties with image 0/3 (ties count against) -> miss at 1 and 2
    assert r["t2i_R@1"] == pytest.approx(3 / 4) and r["t2i_R@2"] == pytest.approx(3 / 4)
    # i2t over images that own texts (0, 1, 3): image 1 scores its own text 2 at 0, tied with
    # texts 0 and 3 and below text 1 -> rank 3; image 2 owns no text and is left out
    assert r["i2t_R@1"] == pytest.approx(2 / 3)
    collapsed = retrieval_recall_at_k(np.ones((5, 3)), np.ones((5, 3)), ks=(1,))
    assert collapsed == {"i2t_R@1": 0.0, "t2i_R@1": 0.0}


def test_retrieval_perfect_and_chunked() -> None:
    emb = np.random.default_rng(0).normal(size=(1500, 16))
    r = retrieval_recall_at_k(emb, emb + 1e-3, ks=(1,))
    assert r == {"i2t_R@1": 1.0, "t2i_R@1": 1.0}


def test_matched_vs_random_cosine() -> None:
    emb = np.random.default_rng(0).normal(size=(50, 32))
    owner = np.repeat(np.arange(50), 2)
    out = matched_vs_random_cosine(emb, emb[owner], owner, seed=0)
    assert out["matched"] == pytest.approx(1.0, abs=1e-5)
    assert abs(out["random"]) < 0.2 and out["gap"] == pytest.approx(out["matched"] - out["random"])
    assert out == matched_vs_random_cosine(emb, emb[owner], owner, seed=0)


def test_tokenize_caption() -> None:
    assert tokenize_caption("A man's red T-shirt, on a bench.") == [
        "a",
        "man's",
        "red",
        "t-shirt",
        "on",
        "a",
        "bench",
    ]


def test_bleu4_by_hand() -> None:
    ref = "the cat sat on the mat"
    assert bleu4([[ref]], ["The cat sat on the mat."]) == pytest.approx(1.0)
    # all precisions 1 (4/4, 3/3, 2/2, 1/1); c=4, r=6 -> brevity penalty exp(1 - 6/4)
    assert bleu4([[ref]], ["the cat sat on"]) == pytest.approx(math.exp(-0.5))
    # the closest reference length (4) is used, so no brevity penalty
    assert bleu4([[ref, "the cat sat on"]], ["the cat sat on"]) == pytest.approx(1.0)
    # clipped unigram precision 2/7 and no matching bigram -> 0 without smoothing
    assert bleu4([[ref]], ["the the the the the the the"]) == 0.0
    # corpus level: n-gram counts are pooled, not sentence scores averaged
    refs = [[ref], ["a dog runs in the park"]]
    pooled = bleu4(refs, ["the cat sat on the mat", "a dog runs in the yard"])
    p = [11 / 12, 9 / 10, 7 / 8, 5 / 6]
    assert pooled == pytest.approx(math.exp(sum(math.log(x) for x in p) / 4))


def test_cider_d_by_hand() -> None:
    # Two items, N = 2; "a" occurs in both reference sets (idf 0), "cat"/"dog"/bigrams in one (idf log 2).
    refs = [["a cat"], ["a dog"]]
    # Matching hypotheses: unigram and bigram cosines are 1, 3- and 4-grams are empty -> 10 * (1+1+0+0)/4.
    assert cider_d_scores(refs, ["a cat", "a dog"]).tolist() == pytest.approx([5.0, 5.0])
    assert cider_d(refs, ["a cat", "a cat"]) == pytest.approx(2.5)
    # Clipping: "cat cat" has tf-idf 2L for "cat" against the reference's L, so the unigram term is
    # min(2L, L) * L / (2L * L) = 0.5 (no clipping would give 1); length penalty exp(-1 / 72).
    assert cider_d_scores([["cat"], ["dog"]], ["cat cat", "dog"])[0] == pytest.approx(
        10 * 0.5 * math.exp(-1 / 72) / 4
    )


def test_cider_d_properties_and_coco_caption_value() -> None:
    refs = [
        ["a man riding a horse on a beach", "a person rides a brown horse along the shore"],
        [
            "two dogs playing with a ball in the grass",
            "dogs chase a red ball on a lawn",
            "two puppies play outside",
        ],
        ["a plate of food with broccoli and rice"],
    ]
    hyps = [
        "a man rides a horse on the beach",
        "a dog plays with a ball",
        "a plate with rice and broccoli",
    ]
    # value printed by pycocoevalcap 1.2 CiderScorer(n=4, sigma=6.0) on these (already tokenised) strings
    assert cider_d(refs, hyps) == pytest.approx(1.8299445594766661, rel=1e-12)
    identical = cider_d_scores(
        [["a red bus on a city street"] * 3, refs[1]], ["a red bus on a city street", hyps[1]]
    )
    different = cider_d_scores(
        [["a red bus on a city street"] * 3, refs[1]], ["a green tree in a field", hyps[1]]
    )
    assert identical[0] > different[0]
    with pytest.raises(ValueError):
        cider_d([["a cat"]], [])


def test_caption_metrics_match_coco_caption_on_real_captions(coco_mini: Path) -> None:
    annotations = json.loads((coco_mini / "annotations" / "captions_train2017.json").read_text())[
        "annotations"
    ]
    captions: dict[int, list[str]] = {}
    for a in annotations:
        captions.setdefault(a["image_id"], []).append(a["caption"])
    ids = sorted(captions)
    rng = random.Random(0)
    refs, hyps = [], []
    for image_id in ids:
        own = list(captions[image_id])
        hyps.append(own.pop(0) if rng.random() < 0.5 else captions[rng.choice(ids)][0])
        refs.append(own[: rng.randint(1, len(own))])
    # values from pycocoevalcap 1.2 (CiderScorer; BleuScorer option="closest") on the same
    # captions after tokenize_caption; its BLEU adds a 1e-9 smoothing, hence rel=1e-9
    assert cider_d(refs, hyps) == pytest.approx(0.446983700702057, rel=1e-9)
    assert bleu4(refs, hyps) == pytest.approx(0.06850063967490574, rel=1e-9)


def test_perplexity() -> None:
    assert perplexity(10 * math.log(4.0), 10) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
