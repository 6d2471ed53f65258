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

Nothing here is trained by the optimiser: the table, the token weights and the classifier are
fitted in the pipeline (closed form / logistic regression) and stored as buffers, so the
release carries them and never needs the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def token_counts(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, vocab_size]: how often each token occurs in each row (padding excluded)."""
    counts = torch.zeros(input_ids.shape[0], vocab_size, device=input_ids.device)
    return counts.scatter_add_(1, input_ids, attention_mask.float())


class TaskKnowledge(nn.Module):
    """Static task vectors [B, dim], token TF-IDF vectors [B, vocab] and knowledge logits [B, classes]."""

    def __init__(self, vocab_size: int, dim: int, num_classes: int, token_tfidf: bool = False) -> None:
        super().__init__()
        self.token_tfidf = token_tfidf
        # fp16 like the embedding a BitNet release keeps; the table is the module's whole size.
        self.register_buffer("table", torch.zeros(vocab_size, dim, dtype=torch.float16))
        self.register_buffer("token_weights", torch.zeros(vocab_size))
        self.register_buffer("classifier_weight", torch.zeros(num_classes, dim))
        self.register_buffer("classifier_bias", torch.zeros(num_classes))
        self.register_buffer("weight", torch.zeros(()))
        if token_tfidf:
            self.register_buffer("token_idf", torch.zeros(vocab_size))
            self.register_buffer("tfidf_classifier", torch.zeros(num_classes, vocab_size, dtype=torch.float16))

    def task_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """v(x): the SIF-weighted mean of the tokens' rows, L2-normalised (zero for no known token)."""
        w = self.token_weights[input_ids] * attention_mask.to(self.token_weights.dtype)
        rows = self.table[input_ids].float()
        pooled = (rows * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1e-6)
        return F.normalize(pooled, dim=-1)

    def tfidf_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """u(x): token counts times idf, L2-normalised (sklearn's TfidfVectorizer, norm="l2")."""
        counts = token_counts(input_ids, attention_mask, self.token_idf.shape[0])
        return F.normalize(counts * self.token_idf, dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        v = self.task_vectors(input_ids, attention_mask)
        logits = v @ self.classifier_weight.T + self.classifier_bias
        if self.token_tfidf:
            logits = logits + self.tfidf_vectors(input_ids, attention_mask) @ self.tfidf_classifier.float().T
        return self.weight * logits

    @torch.no_grad()
    def load_fitted(
        self,
        table: torch.Tensor,
        token_weights: torch.Tensor,
        classifier_weight: torch.Tensor,
        classifier_bias: torch.Tensor,
        weight: float,
        token_idf: torch.Tensor | None = None,
        tfidf_classifier: torch.Tensor | None = None,
    ) -> None:
        """Install what the pipeline fitted (shapes must match the module's; the TF-IDF pair
        exactly when the module has a token TF-IDF view)."""
        fitted = [
            ("table", table),
            ("token_weights", token_weights),
            ("classifier_weight", classifier_weight),
            ("classifier_bias", classifier_bias),
        ]
        if (token_idf is None or tfidf_classifier is None) == self.token_tfidf:
            raise ValueError(f"token_idf/tfidf_classifier: given exactly when token_tfidf is on ({self.token_tfidf})")
        if self.token_tfidf:
            fitted += [("token_idf", token_idf), ("tfidf_classifier", tfidf_classifier)]
        for name, value in fitted:
            buffer = getattr(self, name)
            if tuple(value.shape) != tuple(buffer.shape):
                raise ValueError(f"{name}: expected shape {tuple(buffer.shape)}, received {tuple(value.shape)}")
            buffer.copy_(value.to(buffer.dtype))
        self.weight.fill_(float(weight))
