"""Word knowledge for robot selection: a static token table distilled from a sentence encoder.

173 training tasks cannot teach what "barnacles" or "screwdriver" mean; a pretrained sentence
encoder (the teacher) knows. At training time each token of BitMar's own vocabulary is run
through the teacher alone and the vectors are reduced by PCA (the Model2Vec recipe); a task's
vector is then the SIF-weighted mean of its tokens' rows,

    v(x) = normalize( sum_t w[x_t] E[x_t] / sum_t w[x_t] ),   w[i] = a / (a + p(i)),

where p(i) is the token's frequency in the training corpus, so frequent words count little.
The static vectors carry word meaning but blur the dataset's own cue words, which a sparse
TF-IDF view of the same tokens keeps, u(x) = normalize(count(x, i) * idf(i)). A linear
classifier fitted on [v(x), u(x)] for the training tasks and on short capability phrases of
each robot gives knowledge logits, added to the selection head's:

    robot_logits = head(task, image) + weight * (W v(x) + U u(x) + b).

With `words` > 0 the static vectors come from a table of whole WORDS instead of tokens: the
teacher embeds each word of its own vocabulary (and of the training texts) alone, so "hull" or
"rubble" keep their meaning where BitMar's small BPE cuts them into pieces the teacher cannot
read. The module finds the words in BitMar's own token ids (a word = a run of letter tokens, a
new one at each token that starts with a space) and looks each up by a hash of its token ids,
so the release needs no second tokenizer:

    key(word) = h_1 * 2^31 + h_2,   h_j = sum_k id_k * base_j^k  mod (2^31 - 1),

with every casing of a word ("hull", " hull", "Hull", " Hull") stored under its own key.
Words not in the table add nothing.

With `fleet_texts` > 0 the module also stores the vectors of the trained robots' own descriptions
(name, capabilities, environments: one text a robot), and adds how well the task fits each robot's
description next to how well it fits the best-fitting robot's (`fleet_fit_margins`; "No Robot"
has no description and gets 0):

    robot_logits += fit_weight * (cos(v(x), d_r) - max_r' cos(v(x), d_r')),

the kind of fit the fleet-only robots are selected by (evaluation.zero_shot, over their phrases),
given to the trained ones: it reads a user's short wording where the labelled tasks' classifier has
no cue. With `known_tasks` > 0 the module also keeps the train tasks' vectors k_j, and the fit counts
by how unlike them the task is worded,

    robot_logits += fit_weight * (1 - max_j cos(v(x), k_j))^p * (cos(v(x), d_r) - max_r' cos(v(x), d_r')),

so a task worded like the labelled ones is left to the classifier that learned their cues, and a
short task in a user's own words is read by its fit (measured in docs/decisions.md).

With `label_sets` S > 0 the module also scores S robot sets (the label sets the labelled tasks
have, e.g. {Drone, Robot with Legs}) with a softmax classifier over the task's features, and the
robots other than the top one get the probability that the set holds them, given it holds the top
robot t = argmax_r robot_logits[r]:

    p_r = min( sum_{S: t, r in S} q_S(x) / sum_{S: t in S} q_S(x),  (1 - 1e-6) p_t ),   r != t,

so the top robot, its probability and "No Robot" stay as they were and `select_robots` (a robot at
or above 0.5) takes a runner-up when the sets say it goes with the top one (and p_t >= 0.5). A
robot never labelled alone (twice) goes with its usual companions whenever it is on top. Per-robot
scores cannot say which robots go together ("a climb and a view from above": Drone with Legs); one
set classifier can (measured in docs/decisions.md).

With `no_robot_gate` the module also holds a logistic regression over the task vector, fitted on
labelled non-robot tasks against the robot tasks ("Draft a cover letter" vs "Inspect a ship hull"),
and a threshold t on its log-odds g(x) chosen on validation. The public data has no "No Robot" task,
so neither the head nor the classifier can learn that class; the gate decides it instead:

    past its threshold (g > t):  robot_logits[No Robot] = g,  robot_logits[r] = min(robot_logits[r], -g)
    otherwise:                   robot_logits[No Robot] = min(g, max_r robot_logits[r]),

so `select_robots` ("No Robot" when it beats the best robot) picks it exactly when g(x) > t (t > 0:
then sigmoid(g) > 1/2 > sigmoid(-g), whatever the robots' logits, even saturated ones), a "No Robot"
pick shows the gate's own probability, and no robot claims more than 1 - P(no robot).

With `context_layers` > 0 a task's vector is contextual: a small pre-norm transformer encoder reads
the task's known words in order (their table rows plus learned positions; unknown words masked),
mean-pools them and projects to the teacher's width. It is distilled in the pipeline to regress the
teacher's SENTENCE vectors (cosine loss) on far more text than the labelled tasks, so "inspect"
next to "hull" reads differently from "inspect" next to "roof", which no bag of static rows can:

    v(x) = normalize( P mean_{w known} Enc(E[w] + pos_w) ).

Nothing here is trained by the model's optimiser: the table, the token weights, the encoder and the
classifier are fitted in the pipeline (closed form / its own distillation loop / logistic regression)
and stored as buffers, so the
release carries them and never needs the teacher.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from bitmar_model.robots import ROBOT_INDEX

_MOD = 2**31 - 1  # Mersenne prime: each h_j < 2^31, so id * base^k mod p and sums of them fit in int64
_BASES = (1_000_003, 999_983)
WORD_FORMS = 4  # " word", " Word", "word", "Word": the forms a word takes in a prompt
NO_ROBOT_COLUMN = ROBOT_INDEX["No Robot"]


def context_parameter_shapes(dim: int, out: int, layers: int, positions: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the contextual encoder's tensors (`context_vectors` reads them)."""
    shapes: dict[str, tuple[int, ...]] = {"position": (positions, dim)}
    for i in range(layers):
        shapes |= {
            f"l{i}_norm1_weight": (dim,), f"l{i}_norm1_bias": (dim,),
            f"l{i}_qkv_weight": (3 * dim, dim), f"l{i}_qkv_bias": (3 * dim,),
            f"l{i}_out_weight": (dim, dim), f"l{i}_out_bias": (dim,),
            f"l{i}_norm2_weight": (dim,), f"l{i}_norm2_bias": (dim,),
            f"l{i}_fc1_weight": (2 * dim, dim), f"l{i}_fc1_bias": (2 * dim,),
            f"l{i}_fc2_weight": (dim, 2 * dim), f"l{i}_fc2_bias": (dim,),
        }
    return shapes | {"proj_weight": (out, dim), "proj_bias": (out,)}


def known_width(known: torch.Tensor) -> int:
    """Slots up to the last known word of the longest row (at least 1): the rest is padding."""
    return max(1, int(known.cumsum(1).argmax(1).max()) + 1)


def context_vectors(
    weights: dict[str, torch.Tensor], rows: torch.Tensor, known: torch.Tensor, layers: int, heads: int
) -> torch.Tensor:
    """[B, out]: the pre-norm transformer encoder over word rows [B, W, d] (attending to known
    words only), mean-pooled over them, projected, L2-normalised; zero for a row with none."""
    batch, width, dim = rows.shape
    x = rows + weights["position"][:width]
    # A row with no known word attends to its first slot (all -inf would give NaN); pooling drops it.
    attend = known.clone()
    attend[:, 0] |= ~known.any(1)
    mask = attend[:, None, None, :]
    for i in range(layers):
        w = {k.removeprefix(f"l{i}_"): v for k, v in weights.items() if k.startswith(f"l{i}_")}
        h = F.layer_norm(x, (dim,), w["norm1_weight"], w["norm1_bias"])
        q, k, v = F.linear(h, w["qkv_weight"], w["qkv_bias"]).view(batch, width, 3, heads, -1).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        x = x + F.linear(a.transpose(1, 2).reshape(batch, width, dim), w["out_weight"], w["out_bias"])
        h = F.layer_norm(x, (dim,), w["norm2_weight"], w["norm2_bias"])
        x = x + F.linear(F.gelu(F.linear(h, w["fc1_weight"], w["fc1_bias"])), w["fc2_weight"], w["fc2_bias"])
    k_mask = known[..., None].to(x.dtype)
    pooled = (x * k_mask).sum(1) / k_mask.sum(1).clamp(min=1)
    out = F.linear(pooled, weights["proj_weight"], weights["proj_bias"])
    return F.normalize(out, dim=-1) * known.any(1, keepdim=True)


class ContextEncoder(nn.Module):
    """The contextual encoder's tensors as buffers: fitted in the pipeline, never by the model's optimiser."""

    def __init__(self, dim: int, out: int, layers: int, positions: int, heads: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"knowledge context: width {dim} is not a multiple of {heads} heads")
        self.layers, self.heads = layers, heads
        for name, shape in context_parameter_shapes(dim, out, layers, positions).items():
            self.register_buffer(name, torch.zeros(shape))

    def weights(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers())

    def forward(self, rows: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        return context_vectors(self.weights(), rows, known, self.layers, self.heads)


@functools.lru_cache(maxsize=8)
def _powers(base: int, length: int) -> torch.Tensor:
    return torch.tensor([pow(base, k, _MOD) for k in range(length)], dtype=torch.int64)


def word_keys(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, token_letter: torch.Tensor, token_space: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys [B, T] int64, valid [B, T] bool): the key of each row's w-th word at slot w.

    A word is a run of letter tokens; a token that starts with a space starts a new one (byte-level
    BPE never joins letters across a space, so a token is never shared by two words)."""
    length = input_ids.shape[1]
    letter = token_letter[input_ids] & attention_mask.bool()
    before = F.pad(letter[:, :-1], (1, 0), value=False)
    starts = letter & (~before | token_space[input_ids])
    slot = (starts.long().cumsum(1) - 1).clamp(min=0)
    t = torch.arange(length, device=input_ids.device)
    position = t - torch.where(starts, t, torch.zeros_like(t)).cummax(1).values
    keys = torch.zeros_like(input_ids, dtype=torch.int64)
    for base in _BASES:
        term = input_ids.long() * _powers(base, length).to(input_ids.device)[position] % _MOD
        h = torch.zeros_like(keys).scatter_add_(1, slot, torch.where(letter, term, 0)) % _MOD
        keys = keys * 2**31 + h
    return keys, t[None, :] < starts.sum(1, keepdim=True)


def token_counts(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, vocab_size]: how often each token occurs in each row (padding excluded)."""
    counts = torch.zeros(input_ids.shape[0], vocab_size, device=input_ids.device)
    return counts.scatter_add_(1, input_ids, attention_mask.float())


class TaskKnowledge(nn.Module):
    """Static task vectors [B, dim], token TF-IDF vectors [B, vocab] and knowledge logits [B, classes]."""

    def __init__(
        self, vocab_size: int, dim: int, num_classes: int, token_tfidf: bool = False, words: int = 0,
        context_layers: int = 0, context_out: int = 0, max_words: int = 0, fleet_texts: int = 0,
        no_robot_gate: bool = False, known_tasks: int = 0, novelty_power: float = 0.0, label_sets: int = 0,
    ) -> None:
        super().__init__()
        self.token_tfidf = token_tfidf
        self.words = words
        if context_layers and not (words and context_out and max_words):
            raise ValueError("knowledge context: needs the word table (words > 0), context_out > 0 and max_words > 0")
        self.context = ContextEncoder(dim, context_out, context_layers, max_words) if context_layers else None
        width = context_out if context_layers else dim
        if words:
            # int8 rows with a scale each: the word table is the module's whole size (~128 B a word).
            self.register_buffer("word_table", torch.zeros(words, dim, dtype=torch.int8))
            self.register_buffer("word_scale", torch.zeros(words))
            self.register_buffer("word_weights", torch.zeros(words))
            self.register_buffer("word_keys", torch.full((WORD_FORMS * words,), -1, dtype=torch.int64))
            self.register_buffer("word_rows", torch.zeros(WORD_FORMS * words, dtype=torch.int32))
            self.register_buffer("token_letter", torch.zeros(vocab_size, dtype=torch.bool))
            self.register_buffer("token_space", torch.zeros(vocab_size, dtype=torch.bool))
        else:
            # fp16 like the embedding a BitNet release keeps; the table is the module's whole size.
            self.register_buffer("table", torch.zeros(vocab_size, dim, dtype=torch.float16))
            self.register_buffer("token_weights", torch.zeros(vocab_size))
        self.register_buffer("classifier_weight", torch.zeros(num_classes, width))
        self.register_buffer("classifier_bias", torch.zeros(num_classes))
        self.register_buffer("weight", torch.zeros(()))
        if token_tfidf:
            self.register_buffer("token_idf", torch.zeros(vocab_size))
            self.register_buffer("tfidf_classifier", torch.zeros(num_classes, vocab_size, dtype=torch.float16))
        self.fleet_texts = fleet_texts
        if fleet_texts:
            self.register_buffer("fleet_vectors", torch.zeros(fleet_texts, width))
            self.register_buffer("fleet_owners", torch.zeros(fleet_texts, dtype=torch.int64))  # robot columns
            self.register_buffer("fit_weight", torch.zeros(()))
        if known_tasks and not fleet_texts:
            raise ValueError("knowledge known_tasks: they weight the fleet fit, which needs fleet_texts > 0")
        self.known_tasks = known_tasks
        self.novelty_power = float(novelty_power)
        if known_tasks:
            # fp16 like the table: the vectors only rank a task's nearest train task.
            self.register_buffer("known_vectors", torch.zeros(known_tasks, width, dtype=torch.float16))
        self.no_robot_gate = no_robot_gate
        if no_robot_gate:
            self.register_buffer("gate_weight", torch.zeros(width))
            self.register_buffer("gate_bias", torch.zeros(()))
            # +inf: the gate never fires (not fitted, or "off" chosen on validation).
            self.register_buffer("gate_threshold", torch.full((), float("inf")))
        self.label_sets = label_sets
        if label_sets:
            self.register_buffer("set_members", torch.zeros(label_sets, num_classes))  # 1: the set holds the robot
            self.register_buffer("set_weight", torch.zeros(label_sets, width))
            self.register_buffer("set_bias", torch.zeros(label_sets))
            if token_tfidf:
                self.register_buffer("set_tfidf", torch.zeros(label_sets, vocab_size, dtype=torch.float16))

    def word_rows_of(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [B, T], found [B, T]): the word table row of each row's w-th word, and whether
        that word is in the table."""
        keys, valid = word_keys(input_ids, attention_mask, self.token_letter, self.token_space)
        at = torch.searchsorted(self.word_keys, keys).clamp(max=self.word_keys.shape[0] - 1)
        return self.word_rows[at].long(), valid & (self.word_keys[at] == keys)

    def task_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """v(x): the SIF-weighted mean of the tokens' (or words') rows, L2-normalised (zero when
        none is known); with a context encoder, its vector of the known words in order."""
        if self.context is not None:
            return self.context(*self.word_vectors(input_ids, attention_mask))
        if self.words:
            index, found = self.word_rows_of(input_ids, attention_mask)
            w = self.word_weights[index] * found
            rows = self.word_table[index].float() * self.word_scale[index, None]
        else:
            w = self.token_weights[input_ids] * attention_mask.to(self.token_weights.dtype)
            rows = self.table[input_ids].float()
        pooled = (rows * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1e-6)
        return F.normalize(pooled, dim=-1)

    def word_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [B, W, dim], known [B, W]): each word's dequantised table row in order, W = the
        most words in a row (capped at the encoder's positions), and whether the table knows it."""
        index, found = self.word_rows_of(input_ids, attention_mask)
        width = min(known_width(found), self.context.position.shape[0])
        index, found = index[:, :width], found[:, :width]
        return self.word_table[index].float() * self.word_scale[index, None] * found[..., None], found

    def tfidf_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """u(x): token counts times idf, L2-normalised (sklearn's TfidfVectorizer, norm="l2")."""
        counts = token_counts(input_ids, attention_mask, self.token_idf.shape[0])
        return F.normalize(counts * self.token_idf, dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, classes]: the knowledge logits added to the head's."""
        return self.logits_of(self.task_vectors(input_ids, attention_mask), input_ids, attention_mask)

    def selection_logits(
        self, head_logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """[B, classes]: the head's logits plus the knowledge's, "No Robot" decided by the gate if any."""
        v, u = self.task_vectors(input_ids, attention_mask), self._tfidf_view(input_ids, attention_mask)
        logits = head_logits + self._knowledge_logits(v, u)
        if self.label_sets:
            logits = secondary_from_sets(logits, self._set_scores(v, u), self.set_members)
        if not self.no_robot_gate:
            return logits
        return gate_no_robot(logits, self.no_robot_log_odds(v), self.gate_threshold)

    def no_robot_log_odds(self, task_vectors: torch.Tensor) -> torch.Tensor:
        """[B]: the gate's log-odds that no robot is for the task ("No Robot" past `gate_threshold`)."""
        return task_vectors @ self.gate_weight + self.gate_bias

    def logits_of(self, v: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._knowledge_logits(v, self._tfidf_view(input_ids, attention_mask))

    def set_logits(self, v: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, label_sets]: the set classifier's logits over the same features as the robot classifier's."""
        return self._set_scores(v, self._tfidf_view(input_ids, attention_mask))

    def _tfidf_view(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        return self.tfidf_vectors(input_ids, attention_mask) if self.token_tfidf else None

    @staticmethod
    def _linear(
        v: torch.Tensor, u: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
        tfidf_weight: torch.Tensor | None,
    ) -> torch.Tensor:
        """The classifiers' one form over the task's features: v W^T + b, plus u U^T with the TF-IDF view u."""
        logits = v @ weight.T + bias
        return logits if u is None else logits + u @ tfidf_weight.float().T

    def _knowledge_logits(self, v: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        tfidf = self.tfidf_classifier if self.token_tfidf else None
        logits = self.weight * self._linear(v, u, self.classifier_weight, self.classifier_bias, tfidf)
        if not self.fleet_texts:
            return logits
        return logits + self.fit_weight * self.fit_novelty(v)[:, None] * self.fit_margins(v)

    def _set_scores(self, v: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        tfidf = self.set_tfidf if self.token_tfidf else None
        return self._linear(v, u, self.set_weight, self.set_bias, tfidf)

    def fit_novelty(self, task_vectors: torch.Tensor) -> torch.Tensor:
        """[B]: (1 - the task's best cosine to a known train task)^p, in [0, 1]; 1 without known tasks."""
        if not self.known_tasks:
            return task_vectors.new_ones(task_vectors.shape[0])
        nearest = (task_vectors @ self.known_vectors.float().T).max(dim=1).values
        return (1 - nearest).clamp(0, 1) ** self.novelty_power

    def fit_margins(self, task_vectors: torch.Tensor) -> torch.Tensor:
        """[B, classes]: each trained robot's fleet fit minus the best one's (<= 0), 0 for "No Robot"."""
        return fleet_fit_margins(task_vectors, self.fleet_vectors, self.fleet_owners, self.classifier_bias.shape[0])

    @torch.no_grad()
    def load_fleet(self, vectors: torch.Tensor, owners: torch.Tensor) -> None:
        """Install the trained robots' description vectors [P, width] and their robot columns [P]."""
        if not self.fleet_texts:
            raise ValueError("load_fleet: the module stores no fleet texts (fleet_texts 0)")
        self._install([("fleet_vectors", vectors), ("fleet_owners", owners)])

    @torch.no_grad()
    def load_known(self, vectors: torch.Tensor) -> None:
        """Install the labelled (train and typed) tasks' vectors [known_tasks, width], L2-normalised as
        task_vectors gives them."""
        if not self.known_tasks:
            raise ValueError("load_known: the module keeps no known tasks (known_tasks 0)")
        self._install([("known_vectors", vectors)])

    @torch.no_grad()
    def load_gate(self, weight: torch.Tensor, bias: float) -> None:
        """Install the fitted no-robot gate [width] and bias; its threshold stays as it is."""
        if not self.no_robot_gate:
            raise ValueError("load_gate: the module has no no-robot gate (no_robot_gate False)")
        self._install([("gate_weight", weight)])
        self.gate_bias.fill_(float(bias))

    @torch.no_grad()
    def load_label_sets(
        self, members: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tfidf: torch.Tensor | None = None
    ) -> None:
        """Install the robot sets [S, classes] (1 where a set holds the robot) and their classifier
        (weight [S, width], bias [S], and the TF-IDF part [S, vocab] exactly when the module has that view)."""
        if not self.label_sets:
            raise ValueError("load_label_sets: the module scores no label sets (label_sets 0)")
        if (tfidf is None) == self.token_tfidf:
            raise ValueError(f"load_label_sets: tfidf is given exactly when token_tfidf is on ({self.token_tfidf})")
        named = [("set_members", members), ("set_weight", weight), ("set_bias", bias)]
        self._install(named + ([("set_tfidf", tfidf)] if self.token_tfidf else []))

    def static_buffer_names(self) -> tuple[str, ...]:
        if self.words:
            return ("word_table", "word_scale", "word_weights", "word_keys", "word_rows", "token_letter", "token_space")
        return ("table", "token_weights")

    @torch.no_grad()
    def load_static(self, **buffers: torch.Tensor) -> None:
        """Install the static part: `table` and `token_weights`, or with words the word_* buffers
        and the token flags (exactly `static_buffer_names()`, shapes as the module's)."""
        if set(buffers) != set(self.static_buffer_names()):
            raise ValueError(f"load_static: expected {sorted(self.static_buffer_names())}, received {sorted(buffers)}")
        self._install(buffers.items())

    @torch.no_grad()
    def load_context(self, weights: dict[str, torch.Tensor]) -> None:
        """Install the distilled context encoder (exactly its tensors, shapes as the module's)."""
        if self.context is None or set(weights) != set(self.context.weights()):
            raise ValueError("load_context: the module has no context encoder, or the tensors' names differ")
        self._install(weights.items(), self.context)

    @torch.no_grad()
    def load_fitted(
        self,
        classifier_weight: torch.Tensor,
        classifier_bias: torch.Tensor,
        weight: float,
        token_idf: torch.Tensor | None = None,
        tfidf_classifier: torch.Tensor | None = None,
    ) -> None:
        """Install the fitted classifier (shapes must match the module's; the TF-IDF pair exactly
        when the module has a token TF-IDF view)."""
        fitted = [("classifier_weight", classifier_weight), ("classifier_bias", classifier_bias)]
        if (token_idf is None or tfidf_classifier is None) == self.token_tfidf:
            raise ValueError(f"token_idf/tfidf_classifier: given exactly when token_tfidf is on ({self.token_tfidf})")
        if self.token_tfidf:
            fitted += [("token_idf", token_idf), ("tfidf_classifier", tfidf_classifier)]
        self._install(fitted)
        self.weight.fill_(float(weight))

    def _install(self, named: Iterable[tuple[str, torch.Tensor]], owner: nn.Module | None = None) -> None:
        for name, value in named:
            buffer = getattr(owner or self, name)
            if tuple(value.shape) != tuple(buffer.shape):
                raise ValueError(f"{name}: expected shape {tuple(buffer.shape)}, received {tuple(value.shape)}")
            buffer.copy_(value.to(buffer.dtype))


def fleet_fit_scores(
    task_vectors: torch.Tensor, phrase_vectors: torch.Tensor, owners: torch.Tensor, robots: int, top_k: int = 2
) -> torch.Tensor:
    """How much better each task matches each robot's own description than the fleet's average,
    [B, d] x [P, d] -> [B, robots]:

        s_r(x) = mean of the top_k largest cos(v(x), p_j) over r's phrases j (owners[j] == r),
        score_r(x) = s_r(x) - mean over the fleet's robots of s(x).

    Nothing here depends on which robots were trained, so a robot described only by its phrases
    scores like any other (zero-shot); every robot needs at least one phrase."""
    cosine = task_vectors @ phrase_vectors.T
    per_robot = []
    for robot in range(robots):
        own = cosine[:, owners == robot]
        if own.shape[1] == 0:
            raise ValueError(f"fleet_fit_scores: robot {robot} has no phrase")
        per_robot.append(own.topk(min(top_k, own.shape[1]), dim=1).values.mean(dim=1))
    scores = torch.stack(per_robot, dim=1)
    return scores - scores.mean(dim=1, keepdim=True)


def fleet_fit_margins(
    task_vectors: torch.Tensor, phrase_vectors: torch.Tensor, owners: torch.Tensor, columns: int
) -> torch.Tensor:
    """[B, columns]: `fleet_fit_scores` over the columns that own a phrase, minus the best of them
    (so the best-fitting robot keeps its logit and the rest lose); 0 in a column without phrases.
    A margin, not the centred score: measured on the CV folds, adding the centred score also raised
    the runner-up robots past 0.5 and cost exact-set accuracy (docs/decisions.md)."""
    present = torch.unique(owners)
    scores = fleet_fit_scores(task_vectors, phrase_vectors, torch.searchsorted(present, owners), len(present))
    margins = task_vectors.new_zeros(task_vectors.shape[0], columns)
    margins[:, present] = scores - scores.max(dim=1, keepdim=True).values
    return margins


TOP_GAP = 1e-6  # relative: a runner-up's probability stays this far below the top one's, distinct in fp32


def secondary_from_sets(logits: torch.Tensor, set_logits: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """`logits` [B, classes] with each robot but the top one (the best robot column) replaced by the
    log-odds that the set holds it, given the set holds the top robot, under softmax(`set_logits`)
    [B, S] over the sets `members` [S, classes]; capped at (1 - TOP_GAP) times the top robot's
    probability, so it stays on top in any argmax over the fp32 probabilities. "No Robot" and a row
    whose top robot no set holds are left as they were."""
    with torch.autocast(logits.device.type, enabled=False):  # bf16 keeps ~3 digits; the cap needs fp32's
        values, set_logits, members = logits.float(), set_logits.float(), members.float()
        robots = torch.ones(values.shape[1], dtype=torch.bool, device=values.device)
        robots[NO_ROBOT_COLUMN] = False
        top = values.masked_fill(~robots, -torch.inf).argmax(dim=1)
        holds_top = members[:, top].T > 0  # [B, S]
        weights = torch.softmax(set_logits.masked_fill(~holds_top, -torch.inf), dim=1).nan_to_num(0.0)
        ceiling = torch.sigmoid(values.gather(1, top[:, None])) * (1 - TOP_GAP)
        in_set = torch.logit(torch.minimum(weights @ members, ceiling).clamp(min=1e-12))
        others = robots & ~F.one_hot(top, values.shape[1]).bool()
        replace = others & holds_top.any(dim=1, keepdim=True)
    # Straight through: the values are the sets', the gradient stays the head's, so a selection loss on
    # these logits (GRPO's anchor) still trains every head column.
    return torch.where(replace, logits + (in_set.to(logits.dtype) - logits).detach(), logits)


def gate_no_robot(logits: torch.Tensor, log_odds: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """`logits` [B, classes] with "No Robot" decided by the gate's `log_odds` [B]: where they pass
    `threshold` (> 0), "No Robot" is the gate's log-odds and every robot at most their negative; else
    "No Robot" is at most the best robot's logit (select_robots' strict ">" then keeps the robot).
    Unchanged when the threshold is +inf (off). The best robot's logit is detached: a loss on "No
    Robot" must not move the robots."""
    robots = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
    robots[NO_ROBOT_COLUMN] = False
    best = logits[:, robots].max(dim=1).values.detach()
    fired = log_odds > threshold
    gated = torch.where(fired[:, None], logits.minimum(-log_odds[:, None]), logits).clone()
    column = torch.where(fired, log_odds, log_odds.minimum(best))
    gated[:, NO_ROBOT_COLUMN] = torch.where(torch.isfinite(threshold), column, logits[:, NO_ROBOT_COLUMN])
    return gated
