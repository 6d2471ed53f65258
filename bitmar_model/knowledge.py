"""Word knowledge for robot selection: a static token table distilled from a sentence encoder.

173 training tasks cannot teach what "barnacles" or "screwdriver" mean; a pretrained sentence
encoder (the teacher) knows. At training time each token of BitMar's own vocabulary is run
through the teacher alone and the vectors are reduced by PCA (the Model2Vec recipe); a task's
vector is then the SIF-weighted mean of its tokens' rows,

    v(x) = normalize( sum_t w[x_t] E[x_t] / sum_t w[x_t] ),   w[i] = a / (a + p(i)),

where p(i) is the token's frequency in the training corpus, so frequent words count little.
A linear classifier fitted on v(task) for the training tasks and on short capability phrases
of each robot gives knowledge logits, added to the selection head's:

    robot_logits = head(task, image) + weight * (W v(x) + b).

Nothing here is trained by the optimiser: the table, the token weights and the classifier are
fitted in the pipeline (closed form / logistic regression) and stored as buffers, so the
release carries them and never needs the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TaskKnowledge(nn.Module):
    """Static task vectors [B, dim] and knowledge logits [B, classes] from token ids."""

    def __init__(self, vocab_size: int, dim: int, num_classes: int) -> None:
        super().__init__()
        # fp16 like the embedding a BitNet release keeps; the table is the module's whole size.
        self.register_buffer("table", torch.zeros(vocab_size, dim, dtype=torch.float16))
        self.register_buffer("token_weights", torch.zeros(vocab_size))
        self.register_buffer("classifier_weight", torch.zeros(num_classes, dim))
        self.register_buffer("classifier_bias", torch.zeros(num_classes))
        self.register_buffer("weight", torch.zeros(()))

    def task_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """v(x): the SIF-weighted mean of the tokens' rows, L2-normalised (zero for no known token)."""
        w = self.token_weights[input_ids] * attention_mask.to(self.token_weights.dtype)
        rows = self.table[input_ids].float()
        pooled = (rows * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1e-6)
        return F.normalize(pooled, dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        v = self.task_vectors(input_ids, attention_mask)
        return self.weight * (v @ self.classifier_weight.T + self.classifier_bias)

    @torch.no_grad()
    def load_fitted(
        self,
        table: torch.Tensor,
        token_weights: torch.Tensor,
        classifier_weight: torch.Tensor,
        classifier_bias: torch.Tensor,
        weight: float,
    ) -> None:
        """Install what the pipeline fitted (shapes must match the module's)."""
        for name, value in (
            ("table", table),
            ("token_weights", token_weights),
            ("classifier_weight", classifier_weight),
            ("classifier_bias", classifier_bias),
        ):
            buffer = getattr(self, name)
            if tuple(value.shape) != tuple(buffer.shape):
                raise ValueError(f"{name}: expected shape {tuple(buffer.shape)}, received {tuple(value.shape)}")
            buffer.copy_(value.to(buffer.dtype))
        self.weight.fill_(float(weight))
