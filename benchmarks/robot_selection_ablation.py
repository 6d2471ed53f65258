"""Robot-selection ablation: 5-fold CV over all unique public tasks (issue 12).

Compares text-only selectors that could live inside a tiny self-contained model:
  A  TF-IDF + one-vs-rest LR (the pipeline's baseline class)
  B  teacher (all-MiniLM-L6-v2) sentence embedding + LR        (upper anchor; needs teacher)
  C  teacher zero-shot: cosine(task, robot description) argmax (needs teacher)
  D  Model2Vec-style static table distilled from the teacher + LR
  E  D + capability grounding (cosine / learned pair model against each robot's description)
  F  D with the table fine-tuned to regress teacher sentence embeddings (+ augmented texts)

Folds: int(sha256(task_key), 16) % 5 over the unique normalised task keys (single and multi
files give the same 244 keys with identical gold sets). Labels are the 6 ROBOT_CLASSES
columns; "No Robot" never occurs in the public data (constant 0). Multi-label rule: every
robot with probability >= 0.5, plus always the top one. Choices (C, alpha, thresholds,
temperature) are made by inner CV on the outer fold's training tasks; the user-phrased set
is only reported.

    OMP_NUM_THREADS=1 python benchmarks/robot_selection_ablation.py --teacher <model dir>

Prints one JSON object. Teacher outputs are cached under $TMPDIR/bitmar_ablation_cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from bitmar_model.metrics import (
    exact_set_accuracy,
    expected_calibration_error,
    label_matrix,
    sample_f1,
    top1_accuracy,
)
from bitmar_model.robots import NUM_ROBOT_CLASSES, ROBOT_CLASSES
from bitmar_pipeline.data.robot_tasks import ingest_robot_datasets, parse_instruction_capabilities
from bitmar_pipeline.text.tokenizer import REASONING_TAG_TOKENS, train_bpe_tokenizer
from bitmar_pipeline.training.knowledge import SentenceTeacher

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
USER_SET = ROOT / "bitmar_pipeline" / "evaluation" / "eval_sets" / "user_phrased_robot_tasks.json"
N_FOLDS = 5
ROBOTS = ROBOT_CLASSES[:5]  # the fleet; "No Robot" is not a robot with a description
CACHE = Path(tempfile.gettempdir()) / "bitmar_ablation_cache"


# --- data ---------------------------------------------------------------------------------


@dataclass
class Tasks:
    texts: list[str]
    keys: list[str]
    gold: np.ndarray  # [N, 6] bool
    folds: np.ndarray  # [N]
    subtasks: dict[str, list[str]]  # task_key -> subtask texts (multi file)
    profiles: dict[str, dict[str, list[str]]]  # robot -> capabilities/limitations/environments


def fold_of(task_key: str) -> int:
    return int(hashlib.sha256(task_key.encode()).hexdigest(), 16) % N_FOLDS


def load_tasks(data_dir: Path) -> Tasks:
    d = data_dir / "robot_selection"
    result = ingest_robot_datasets(d / "single_robot_selection.json", d / "multi_robot_selection_dataset.json")
    tasks = result.tasks.drop_duplicates("task_key").reset_index(drop=True)
    id_to_key = dict(zip(result.tasks.task_id, result.tasks.task_key, strict=True))
    subtasks: dict[str, list[str]] = {}
    for row in result.subtasks.itertuples():
        subtasks.setdefault(id_to_key[row.task_id], []).append(row.subtask_text)
    profiles = parse_instruction_capabilities(tasks.instruction.iloc[0])
    return Tasks(
        texts=tasks.task_text.tolist(),
        keys=tasks.task_key.tolist(),
        gold=label_matrix([list(r) for r in tasks.robots]),
        folds=np.array([fold_of(k) for k in tasks.task_key]),
        subtasks=subtasks,
        profiles=profiles,
    )


def load_user_set() -> tuple[list[str], np.ndarray]:
    rows = json.loads(USER_SET.read_text())["tasks"]
    return [r["task"] for r in rows], label_matrix([r["robots"] for r in rows])


def load_captions(data_dir: Path) -> list[str]:
    path = data_dir / "coco-mini" / "annotations" / "captions_train2017.json"
    return [a["caption"] for a in json.loads(path.read_text())["annotations"]]


def robot_description(robot: str, profile: dict[str, list[str]], fields: Sequence[str]) -> str:
    parts = [f"{robot}."] + [f"{f}: {', '.join(profile[f])}." for f in fields]
    return " ".join(parts)


# --- teacher (training-time only) ---------------------------------------------------------


class Teacher:
    """The pipeline's SentenceTeacher (mean pool over the mask, L2 norm), with a disk cache of its vectors."""

    def __init__(self, model_dir: Path) -> None:
        self._encoder = SentenceTeacher(str(model_dir))
        self.tokenizer = self._encoder.tokenizer
        self.tag = hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:10]
        CACHE.mkdir(parents=True, exist_ok=True)
        self._store_path = CACHE / f"teacher_{self.tag}.npz"
        self._store: dict[str, np.ndarray] = {}
        if self._store_path.exists():
            z = np.load(self._store_path, allow_pickle=False)
            self._store = dict(zip(z["texts"].tolist(), z["vectors"], strict=True))

    def encode(self, texts: Sequence[str], batch: int = 64, max_length: int = 128) -> np.ndarray:
        missing = sorted({t for t in texts if t not in self._store}, key=len)
        if missing:
            vecs = self._encoder.encode(missing, batch, max_length)
            self._store.update(zip(missing, vecs, strict=True))
            keys = list(self._store)
            np.savez(self._store_path, texts=np.array(keys), vectors=np.stack([self._store[k] for k in keys]))
        return np.stack([self._store[t] for t in texts]).astype(np.float32)


# --- static (Model2Vec-style) embedder ---------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _prep(text: str) -> str:
    # The teacher is uncased; a leading space gives the first word the same token as elsewhere.
    return " " + text.lower()


class StaticEmbedder:
    """Sentence = L2-normalised SIF-weighted mean of per-token vectors (vocab x d table)."""

    def __init__(self, tokenize: Callable[[str], list[int]], table: np.ndarray, weights: np.ndarray) -> None:
        self.tokenize = tokenize
        self.table = table.astype(np.float16)  # stored in fp16, as a release would
        self.weights = weights.astype(np.float16)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        table = self.table.astype(np.float32)
        w = self.weights.astype(np.float32)
        out = np.zeros((len(texts), table.shape[1]), np.float32)
        for i, text in enumerate(texts):
            ids = self.tokenize(text)
            if ids:
                out[i] = (table[ids] * w[ids, None]).sum(0) / max(w[ids].sum(), 1e-6)
        return _unit(out)

    def nbytes(self) -> int:
        return self.table.nbytes + self.weights.nbytes


def bpe_vocab(texts: list[str], vocab_size: int, extra_words: list[str], workdir: Path):
    """A byte-level BPE trained like the pipeline's (train_bpe_tokenizer) on lowercased texts,
    optionally also on teacher whole words (each twice, so they pass min_frequency=2)."""
    corpus = [_prep(t) for t in texts] + [f" {w} {w}" for w in extra_words]
    tok = train_bpe_tokenizer(corpus, vocab_size, workdir)
    strings = [tok.decode([i]).strip() for i in range(len(tok))]
    specials = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(t) for t in REASONING_TAG_TOKENS}
    backend = tok.backend_tokenizer

    def tokenize(text: str) -> list[int]:
        return [i for i in backend.encode(_prep(text), add_special_tokens=False).ids if i not in specials]

    return strings, tokenize


def wordpiece_vocab(teacher: Teacher):
    tok = teacher.tokenizer
    strings = [s[2:] if s.startswith("##") else s for s in tok.convert_ids_to_tokens(list(range(len(tok))))]
    strings = ["" if s.startswith("[") and s.endswith("]") else s for s in strings]

    def tokenize(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    return strings, tokenize


def distil_static(
    teacher: Teacher,
    strings: list[str],
    tokenize: Callable[[str], list[int]],
    corpus: list[str],
    dim: int,
    sif_a: float = 1e-3,
) -> StaticEmbedder:
    """Model2Vec recipe: each token string alone through the teacher, PCA to `dim`, SIF weights
    a / (a + p(token)) with p from token counts on `corpus` (the fold's training texts)."""
    nonempty = [s for s in strings if s]
    vecs = teacher.encode(nonempty, batch=512, max_length=16)
    lookup = dict(zip(nonempty, vecs, strict=True))
    full = np.stack([lookup[s] if s else np.zeros(vecs.shape[1], np.float32) for s in strings])
    present = np.array([bool(s) for s in strings])
    mean = full[present].mean(0)
    centred = full[present] - mean
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    table = np.zeros((len(strings), dim), np.float32)
    table[present] = centred @ vt[:dim].T
    counts = Counter(i for t in corpus for i in tokenize(t))
    total = sum(counts.values())
    p = np.array([counts.get(i, 0) / total for i in range(len(strings))])
    weights = sif_a / (sif_a + p)
    weights[~present] = 0.0
    return StaticEmbedder(tokenize, table, weights)


def regress_to_teacher(
    emb: StaticEmbedder, full_table: np.ndarray, texts: list[str], targets: np.ndarray, lam: float, dim: int
) -> StaticEmbedder:
    """F: move the (un-projected, teacher-space) token table so the weighted mean of a text's
    tokens regresses the teacher's sentence vector: min ||X T - Y||^2 + lam ||T - T0||^2
    (closed form in the dual), then PCA to `dim`. X = the embedder's pooling weights."""
    w = emb.weights.astype(np.float64)
    x = np.zeros((len(texts), full_table.shape[0]))
    for i, t in enumerate(texts):
        ids = emb.tokenize(t)
        if ids:
            np.add.at(x[i], ids, w[ids])
            x[i] /= max(w[ids].sum(), 1e-6)
    resid = targets - x @ full_table
    alpha = np.linalg.solve(x @ x.T + lam * np.eye(len(texts)), resid)
    table = full_table + x.T @ alpha
    mean = table[w > 0].mean(0)
    _, _, vt = np.linalg.svd(table[w > 0] - mean, full_matrices=False)
    proj = np.where((w > 0)[:, None], (table - mean) @ vt[:dim].T, 0.0)
    return StaticEmbedder(emb.tokenize, proj, emb.weights)


# --- classifiers ------------------------------------------------------------------------


def fit_ovr(x: np.ndarray, gold: np.ndarray, c: float) -> Callable[[np.ndarray], np.ndarray]:
    """One-vs-rest balanced LR per robot column; returns a function giving logits [N, 6]."""
    models: dict[int, LogisticRegression] = {}
    constant: dict[int, float] = {}
    for k in range(NUM_ROBOT_CLASSES):
        col = gold[:, k]
        if col.all() or not col.any():
            constant[k] = 20.0 if col.all() else -20.0
            continue
        models[k] = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(x, col.astype(int))

    def logits(z: np.ndarray) -> np.ndarray:
        out = np.zeros((z.shape[0], NUM_ROBOT_CLASSES))
        for k, m in models.items():
            out[:, k] = m.decision_function(z)
        for k, v in constant.items():
            out[:, k] = v
        return out

    return logits


def pair_features(x: np.ndarray, robot_vecs: np.ndarray) -> np.ndarray:
    """[N, R, d+1]: elementwise product (a diagonal bilinear form) and the cosine."""
    prod = x[:, None, :] * robot_vecs[None, :, :]
    return np.concatenate([prod, prod.sum(-1, keepdims=True)], axis=-1)


def fit_pair(x: np.ndarray, gold: np.ndarray, robot_vecs: np.ndarray, robots: Sequence[int], c: float):
    """One shared binary LR over (task, robot) pairs: fit(t, r) from the robot's description
    vector only, so a robot unseen in training is scored from its description."""
    feats = pair_features(x, robot_vecs)
    xs = feats[:, list(robots), :].reshape(-1, feats.shape[-1])
    ys = gold[:, list(robots)].reshape(-1).astype(int)
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(xs, ys)

    def logits(z: np.ndarray, vecs: np.ndarray = robot_vecs) -> np.ndarray:
        f = pair_features(z, vecs)
        out = np.full((len(z), NUM_ROBOT_CLASSES), -20.0)
        out[:, : vecs.shape[0]] = model.decision_function(f.reshape(-1, f.shape[-1])).reshape(len(z), -1)
        return out

    return logits


# --- decision rule, calibration, metrics -------------------------------------------------


def decide(logits: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Robots with logit >= threshold (sigmoid >= 0.5 at 0), plus always the top one."""
    pred = logits >= threshold
    pred[np.arange(len(logits)), logits.argmax(1)] = True
    return pred


def top_confidence(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits[:, :5] / temperature  # softmax over the fleet; "No Robot" is never a label here
    z = z - z.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return p.max(1)


def fit_temperature(logits: np.ndarray, gold: np.ndarray) -> float:
    correct = gold[np.arange(len(gold)), logits.argmax(1)].astype(float)

    def nll(log_t: float) -> float:
        p = np.clip(top_confidence(logits, float(np.exp(log_t))), 1e-6, 1 - 1e-6)
        return float(-(correct * np.log(p) + (1 - correct) * np.log(1 - p)).mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-4, 4), method="bounded").x))


def scores(logits: np.ndarray, gold: np.ndarray, threshold: float = 0.0) -> dict[str, float]:
    pred = decide(logits, threshold)
    return {
        "top1": top1_accuracy(logits, gold),
        "sample_f1": sample_f1(pred.astype(int), gold.astype(int)),
        "exact_set": exact_set_accuracy(pred.astype(int), gold.astype(int)),
    }


# --- the CV driver -----------------------------------------------------------------------

# A method: fit(train_idx) -> predictor(texts) -> logits [N, 6]. Features are precomputed per fold.
Predictor = Callable[[Sequence[str]], np.ndarray]


@dataclass
class FoldData:
    train_idx: np.ndarray
    test_idx: np.ndarray


def inner_choose(
    fit: Callable[[np.ndarray, dict], Predictor], train_idx: np.ndarray, data: Tasks, grid: list[dict]
) -> tuple[dict, np.ndarray]:
    """Pick the grid point with the best inner-CV (top1 + F1 + exact); also return the chosen
    point's out-of-fold logits on the training tasks (for threshold and temperature)."""
    inner = np.array([int(hashlib.sha256(("inner" + data.keys[i]).encode()).hexdigest(), 16) % 4 for i in train_idx])
    best, best_score, best_oof = grid[0], -1.0, None
    for params in grid:
        oof = np.zeros((len(train_idx), NUM_ROBOT_CLASSES))
        for f in range(4):
            tr, te = train_idx[inner != f], train_idx[inner == f]
            oof[inner == f] = fit(tr, params)([data.texts[i] for i in te])
        s = scores(oof, data.gold[train_idx])
        total = s["top1"] + s["sample_f1"] + s["exact_set"]
        if total > best_score:
            best, best_score, best_oof = params, total, oof
    return best, best_oof


def evaluate(
    name: str,
    make_fit: Callable[[np.ndarray], Callable[[np.ndarray, dict], Predictor]],
    data: Tasks,
    user: tuple[list[str], np.ndarray],
    grid: list[dict],
    tune_threshold: bool = False,
) -> dict:
    """Outer 5-fold CV. `make_fit(outer_train_idx)` builds the fold's featuriser (e.g. a BPE
    and static table from that fold's training texts) and returns fit(train_idx, params)."""
    per_fold, user_rows, eces, chosen = [], [], [], []
    pooled_conf, pooled_hit = [], []
    for f in range(N_FOLDS):
        train_idx, test_idx = np.where(data.folds != f)[0], np.where(data.folds == f)[0]
        fit = make_fit(train_idx)
        params, oof = inner_choose(fit, train_idx, data, grid)
        gold_tr = data.gold[train_idx]
        threshold = 0.0
        if tune_threshold:
            options = [-1.0, -0.5, 0.0, 0.5, 1.0]
            threshold = max(options, key=lambda t: sum(scores(oof, gold_tr, t).values()))
        temperature = fit_temperature(oof, gold_tr)
        predict = fit(train_idx, params)
        logits = predict([data.texts[i] for i in test_idx])
        gold = data.gold[test_idx]
        per_fold.append(scores(logits, gold, threshold))
        conf = top_confidence(logits, temperature)
        hit = gold[np.arange(len(gold)), logits.argmax(1)]
        eces.append(expected_calibration_error(conf, hit))
        pooled_conf.append(conf)
        pooled_hit.append(hit)
        user_rows.append(scores(predict(user[0]), user[1], threshold))
        chosen.append({**params, "threshold": threshold, "temperature": round(temperature, 3)})
    out: dict = {"method": name}
    for metric in ("top1", "sample_f1", "exact_set"):
        vals = np.array([r[metric] for r in per_fold])
        out[metric] = [round(float(vals.mean()), 3), round(float(vals.std()), 3)]
    out["ece_top1_temp_scaled"] = [round(float(np.mean(eces)), 3), round(float(np.std(eces)), 3)]
    out["ece_pooled"] = round(expected_calibration_error(np.concatenate(pooled_conf), np.concatenate(pooled_hit)), 3)
    out["user_top1"] = [
        round(float(np.mean([r["top1"] for r in user_rows])), 3),
        round(float(np.std([r["top1"] for r in user_rows])), 3),
    ]
    out["user_f1"] = round(float(np.mean([r["sample_f1"] for r in user_rows])), 3)
    out["chosen"] = chosen
    print(json.dumps({k: out[k] for k in out if k != "chosen"}), file=sys.stderr, flush=True)
    return out


# --- method builders --------------------------------------------------------------------

C_GRID = [{"c": c} for c in (0.3, 1.0, 3.0, 10.0)]


def method_tfidf(data: Tasks):
    def make_fit(_outer: np.ndarray):
        def fit(idx: np.ndarray, params: dict) -> Predictor:
            vec = TfidfVectorizer(ngram_range=(1, 2), lowercase=True)
            x = vec.fit_transform([data.texts[i] for i in idx])
            lg = fit_ovr(x, data.gold[idx], params["c"])
            return lambda texts: lg(vec.transform(list(texts)))

        return fit

    return make_fit


def capability_sentences(profiles: dict[str, dict[str, list[str]]]) -> tuple[list[str], np.ndarray]:
    """Label-balanced augmentation from the fleet text: each capability/environment item of a
    robot, alone and as "a task that needs <item>", labelled with that robot only."""
    texts, labels = [], []
    for robot in ROBOTS:
        for field in ("capabilities", "environments"):
            for item in profiles[robot][field]:
                for t in (item, f"a task that needs {item}" if field == "capabilities" else f"a task in {item}"):
                    texts.append(t)
                    labels.append([robot])
    return texts, label_matrix(labels)


def method_embed_lr(
    data: Tasks, encode: Callable[[Sequence[str]], np.ndarray] | None, build=None, augment: float = 0.0
):
    """LR on sentence vectors; `build(outer_train_idx)` returns a fold-specific encoder.
    augment > 0 adds the capability sentences (repeated round(augment) times) to training."""
    aug_texts, aug_gold = capability_sentences(data.profiles)

    def make_fit(outer: np.ndarray):
        enc = build(outer) if build else encode
        x_all = enc(data.texts)
        x_aug = enc(aug_texts)

        def fit(idx: np.ndarray, params: dict) -> Predictor:
            reps = int(params.get("aug", augment))
            x = np.concatenate([x_all[idx]] + [x_aug] * reps)
            g = np.concatenate([data.gold[idx]] + [aug_gold] * reps)
            lg = fit_ovr(x, g, params["c"])
            return lambda texts: lg(enc(texts))

        return fit

    return make_fit


def method_zero_shot(data: Tasks, encode, desc_texts: list[str], build=None):
    def make_fit(outer: np.ndarray):
        enc = build(outer) if build else encode
        robots = enc(desc_texts)

        def fit(idx: np.ndarray, params: dict) -> Predictor:
            # A cosine of 1 = logit 1/temp; "threshold" in logit units picks the set.
            def predict(texts):
                cos = enc(texts) @ robots.T
                out = np.full((len(texts), NUM_ROBOT_CLASSES), -20.0)
                out[:, :5] = (cos - cos.max(1, keepdims=True) + params["margin"]) * 20.0
                return out

            return predict

        return fit

    return make_fit


def method_grounded(data: Tasks, encode, desc_texts: list[str], build=None, mode: str = "lr+pair"):
    """E: LR logits + alpha * pair-model logits ('lr+pair'), or LR + alpha * 10 * cosine ('lr+cos'),
    or the pair model alone ('pair')."""

    def make_fit(outer: np.ndarray):
        enc = build(outer) if build else encode
        x_all, robots = enc(data.texts), enc(desc_texts)

        def fit(idx: np.ndarray, params: dict) -> Predictor:
            lr = fit_ovr(x_all[idx], data.gold[idx], params["c"]) if mode != "pair" else None
            pair = fit_pair(x_all[idx], data.gold[idx], robots, range(5), params["c"]) if mode != "lr+cos" else None

            def predict(texts):
                z = enc(texts)
                out = np.zeros((len(texts), NUM_ROBOT_CLASSES))
                if lr is not None:
                    out += lr(z)
                if pair is not None:
                    out += params.get("alpha", 1.0) * pair(z)
                if mode == "lr+cos":
                    cos = np.full((len(texts), NUM_ROBOT_CLASSES), 0.0)
                    cos[:, :5] = z @ robots.T
                    out += params["alpha"] * 10.0 * (cos - cos[:, :5].mean(1, keepdims=True))
                return out

            return predict

        return fit

    return make_fit


# --- zero-shot held-out robot -----------------------------------------------------------


def held_out_robot(data: Tasks, user, encode_for_fold, desc_texts: list[str], c: float = 1.0) -> dict:
    """For each robot R: train the pair model on the other four robots only (R's column removed,
    tasks whose gold is exactly {R} dropped), then score all five from their descriptions."""
    res = {}
    for r in range(5):
        only_r_top1, recall_r, prec_num, prec_den, user_hits, overall = [], [], 0, 0, [], []
        for f in range(N_FOLDS):
            tr = np.where(data.folds != f)[0]
            te = np.where(data.folds == f)[0]
            enc = encode_for_fold(tr)
            x_all, robots = enc(data.texts), enc(desc_texts)
            keep = tr[~(data.gold[tr, :5].sum(1) == data.gold[tr, r]) | ~data.gold[tr, r]]
            known = [k for k in range(5) if k != r]
            pair = fit_pair(x_all[keep], data.gold[keep], robots, known, c)
            lg = pair(x_all[te])
            pred = decide(lg)
            g = data.gold[te]
            only = (g[:, :5].sum(1) == 1) & g[:, r]
            only_r_top1 += list(lg[only].argmax(1) == r)
            recall_r += list(pred[g[:, r], r])
            prec_num += int((pred[:, r] & g[:, r]).sum())
            prec_den += int(pred[:, r].sum())
            overall.append(top1_accuracy(lg, g))
            ul = pair(enc(user[0]))
            um = user[1][:, r]
            user_hits += list(ul[um].argmax(1) == r)
        res[ROBOTS[r]] = {
            "only_R_tasks_top1_is_R": round(float(np.mean(only_r_top1)), 3) if only_r_top1 else None,
            "n_only_R": len(only_r_top1),
            "recall_R_in_set": round(float(np.mean(recall_r)), 3),
            "precision_R": round(prec_num / max(prec_den, 1), 3),
            "overall_top1": round(float(np.mean(overall)), 3),
            "user_R_tasks_top1_is_R": round(float(np.mean(user_hits)), 3),
        }
    return res


# --- main -------------------------------------------------------------------------------

DESC_FIELDS = {
    "cap+env": ("capabilities", "environments"),
    "all": ("capabilities", "limitations", "environments"),
}
MARGIN_GRID = [{"margin": m} for m in (0.0, 0.01, 0.02, 0.04)]
STATIC_VARIANTS = [
    ("bpe", 4096, 64),
    ("bpe", 4096, 128),
    ("bpe+words", 4096, 128),
    ("bpe+words", 8192, 64),
    ("bpe+words", 8192, 128),
    ("wordpiece", 30522, 128),
]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--only", default="", help="comma list of method prefixes to run")
    return ap.parse_args()


@dataclass
class Ablation:
    """What every method of one run shares: tasks, teacher, robot descriptions, the static-table
    cache (one table per vocabulary, size, dimension and outer fold) and the results so far."""

    data: Tasks
    user: tuple[list[str], np.ndarray]
    captions: list[str]
    teacher: Teacher
    descs: dict[str, list[str]]
    vocab_words: list[str]
    aug_texts: list[str]
    only: list[str]
    static_cache: dict[tuple, StaticEmbedder] = dataclass_field(default_factory=dict)
    results: list[dict] = dataclass_field(default_factory=list)

    def run(self, name: str, make_fit, grid, **kw) -> None:
        if self.only and not any(name.startswith(p) for p in self.only):
            return
        self.results.append(evaluate(name, make_fit, self.data, self.user, grid, **kw))

    def corpus(self, outer: np.ndarray) -> list[str]:
        data = self.data
        sub = [s for i in outer for s in data.subtasks.get(data.keys[i], [])]
        return (
            self.captions
            + [data.texts[i] for i in outer]
            + sub
            + [robot_description(r, data.profiles[r], DESC_FIELDS["all"]) for r in ROBOTS]
        )

    def static_builder(self, vocab: str, size: int, dim: int):
        def build(outer: np.ndarray) -> Callable[[Sequence[str]], np.ndarray]:
            key = (vocab, size, dim, hashlib.sha256(outer.tobytes()).hexdigest())
            if key not in self.static_cache:
                texts = self.corpus(outer)
                if vocab == "wordpiece":
                    strings, tokenize = wordpiece_vocab(self.teacher)
                else:
                    words = self.vocab_words if vocab == "bpe+words" else []
                    with tempfile.TemporaryDirectory() as tmp:
                        strings, tokenize = bpe_vocab(texts, size, words, Path(tmp))
                self.static_cache[key] = distil_static(self.teacher, strings, tokenize, texts, dim)
            emb = self.static_cache[key]
            return emb.encode

        return build

    def finetuned_builder(self, size: int, dim: int, lam: float):
        """F: bpe+words static table in teacher space (d=384), regressed onto teacher sentence
        vectors of the fold's training tasks, their subtasks, captions and capability sentences."""
        base = self.static_builder("bpe+words", size, 384)
        cache = self.static_cache

        def build(outer: np.ndarray) -> Callable[[Sequence[str]], np.ndarray]:
            key = ("ft", size, dim, lam, hashlib.sha256(outer.tobytes()).hexdigest())
            if key not in cache:
                base(outer)
                emb = next(v for k, v in cache.items() if k[:3] == ("bpe+words", size, 384) and k[3] == key[4])
                texts = self.corpus(outer)[:-5] + self.aug_texts
                cache[key] = regress_to_teacher(
                    emb, emb.table.astype(np.float64), texts, self.teacher.encode(texts), lam, dim
                )
            return cache[key].encode

        return build


def load_ablation(args: argparse.Namespace) -> Ablation:
    data = load_tasks(args.data)
    user = load_user_set()
    captions = load_captions(args.data)
    teacher = Teacher(args.teacher)
    descs = {k: [robot_description(r, data.profiles[r], v) for r in ROBOTS] for k, v in DESC_FIELDS.items()}
    vocab_words = [w for w in (Path(args.teacher) / "vocab.txt").read_text().split("\n") if w.isalpha() and w.isascii()]
    # Warm the sentence cache in one go.
    teacher.encode(data.texts + user[0] + descs["all"] + descs["cap+env"])
    aug_texts, _ = capability_sentences(data.profiles)
    only = [p for p in args.only.split(",") if p]
    return Ablation(data, user, captions, teacher, descs, vocab_words, aug_texts, only)


def run_teacher_methods(ab: Ablation) -> None:
    """A (TF-IDF), B (teacher embedding + LR), C (teacher zero-shot), E on teacher embeddings."""
    data, teacher_enc, descs = ab.data, ab.teacher.encode, ab.descs
    ab.run("A tfidf+LR", method_tfidf(data), C_GRID)
    ab.run("A tfidf+LR C=1", method_tfidf(data), [{"c": 1.0}])
    ab.run("B minilm+LR C=1", method_embed_lr(data, teacher_enc), [{"c": 1.0}])
    ab.run("B minilm+LR", method_embed_lr(data, teacher_enc), C_GRID)
    ab.run("B minilm+LR thr-tuned", method_embed_lr(data, teacher_enc), C_GRID, tune_threshold=True)
    ab.run("B minilm+LR +capaug x1", method_embed_lr(data, teacher_enc, augment=1), C_GRID)
    ab.run(
        "B minilm+LR +capaug inner-chosen",
        method_embed_lr(data, teacher_enc),
        [{"c": c, "aug": a} for c in (1.0, 3.0, 10.0) for a in (0, 1, 2)],
    )
    for dk in ("all", "cap+env"):
        ab.run(f"C minilm zero-shot desc={dk}", method_zero_shot(data, teacher_enc, descs[dk]), MARGIN_GRID)
    ab.run(
        "E minilm LR+pair",
        method_grounded(data, teacher_enc, descs["all"]),
        [{"c": c, "alpha": a} for c in (1.0, 3.0) for a in (0.5, 1.0)],
    )
    ab.run("E minilm pair-only", method_grounded(data, teacher_enc, descs["all"], mode="pair"), C_GRID)


def run_grounded_static(ab: Ablation, tag: str, build) -> None:
    """E on one static table: zero-shot, LR + cosine, LR + pair model, pair model alone."""
    data, desc = ab.data, ab.descs["all"]
    ab.run(f"E static {tag} zero-shot", method_zero_shot(data, None, desc, build), MARGIN_GRID)
    ab.run(
        f"E static {tag} LR+cos",
        method_grounded(data, None, desc, build, mode="lr+cos"),
        [{"c": c, "alpha": a} for c in (1.0, 3.0, 10.0) for a in (0.5, 1.0, 2.0)],
    )
    ab.run(
        f"E static {tag} LR+pair",
        method_grounded(data, None, desc, build),
        [{"c": c, "alpha": a} for c in (1.0, 3.0, 10.0) for a in (0.5, 1.0)],
    )
    ab.run(f"E static {tag} pair-only", method_grounded(data, None, desc, build, mode="pair"), C_GRID)


def run_static_methods(ab: Ablation) -> dict[str, dict[str, int]]:
    """D and F (+capaug) per static table, E on the two largest vocabularies; the tables' sizes."""
    sizes = {}
    for vocab, size, dim in STATIC_VARIANTS:
        tag = f"{vocab}{size}/d{dim}"
        build = ab.static_builder(vocab, size, dim)
        ab.run(f"D static {tag} +LR", method_embed_lr(ab.data, None, build), C_GRID)
        ab.run(f"F static {tag} +LR +capaug x1", method_embed_lr(ab.data, None, build, augment=1), C_GRID)
        if (vocab, size) in (("bpe+words", 8192), ("wordpiece", 30522)):
            run_grounded_static(ab, tag, build)
        emb = next((v for k, v in ab.static_cache.items() if k[:3] == (vocab, size, dim)), None)
        if emb is not None:
            sizes[tag] = {"table_fp16_bytes": int(emb.table.nbytes), "weights_fp16_bytes": int(emb.weights.nbytes)}
    return sizes


def run_finetuned_methods(ab: Ablation) -> None:
    """F with the table regressed onto teacher sentence vectors, at two ridge strengths."""
    data, desc = ab.data, ab.descs["all"]
    for lam in (0.03, 0.3):
        build = ab.finetuned_builder(8192, 128, lam)
        name = f"F static-ft bpe+words8192/d128 lam={lam}"
        ab.run(f"{name} +LR", method_embed_lr(data, None, build), C_GRID)
        ab.run(f"{name} +LR +capaug x1", method_embed_lr(data, None, build, augment=1), C_GRID)
        ab.run(f"{name} zero-shot", method_zero_shot(data, None, desc, build), MARGIN_GRID)
        ab.run(
            f"{name} LR+pair",
            method_grounded(data, None, desc, build),
            [{"c": c, "alpha": a} for c in (1.0, 3.0, 10.0) for a in (0.5, 1.0)],
        )


def held_out_robot_study(ab: Ablation) -> dict:
    """The zero-shot held-out-robot study on teacher and static embeddings (skipped by --only
    unless it names "held")."""
    held = {}
    if not ab.only or "held" in ab.only:
        teacher_enc = ab.teacher.encode
        held["minilm pair"] = held_out_robot(ab.data, ab.user, lambda tr: teacher_enc, ab.descs["all"])
        held["static bpe+words8192/d128 pair"] = held_out_robot(
            ab.data, ab.user, ab.static_builder("bpe+words", 8192, 128), ab.descs["all"]
        )
    return held


def summary(ab: Ablation, held: dict, sizes: dict, seconds: float) -> dict:
    return {
        "n_tasks": len(ab.data.texts),
        "fold_sizes": np.bincount(ab.data.folds).tolist(),
        "n_user": len(ab.user[0]),
        "user_no_robot": int(ab.user[1][:, 5].sum()),
        "decision_rule": "robots with sigmoid(logit) >= 0.5 plus always the argmax (threshold tuned only where named)",
        "results": ab.results,
        "held_out_robot_zero_shot": held,
        "static_sizes": sizes,
        "seconds": round(seconds, 1),
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    ab = load_ablation(args)
    run_teacher_methods(ab)
    sizes = run_static_methods(ab)
    run_finetuned_methods(ab)
    held = held_out_robot_study(ab)
    print(json.dumps(summary(ab, held, sizes, time.time() - t0), indent=1))


if __name__ == "__main__":
    main()
