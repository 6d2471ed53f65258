"""Copying from the task: a pointer-generator output head (See et al., 2017).

The decoder's next-token distribution mixes generating from the vocabulary with copying a
token of the task it was given:

    p(w) = (1 - g) * softmax(h E^T)[w] + g * sum_{j : x_j = w} a_j
    a    = softmax_j(q(h) . k_j / sqrt(d) + beta * [x_{j-1} = y_t])      (padding masked)
    g    = sigmoid(w_g . h + b_g)

h is the decoder's last hidden state at step t, E the tied embedding table, x the task's
token ids and k_j their context vectors (token embedding + learned position, as the decoder's
cross-attention reads them), y_t the token just read. The bracket is an induction cue: it
points at the task token that follows the one just copied, so a quoted phrase continues in
order without the decoder having to learn positions from 173 tasks. Returned as log p,
which works everywhere logits do (softmax, sampling, cross-entropy, GRPO log-probs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Floor for the copy distribution before the log: a token absent from the task gets no copy
# mass, and log(0) would make the backward pass NaN (0 * inf); 1e-12 shifts no real probability.
COPY_FLOOR = 1e-12


@dataclass
class CopySource:
    """The task tokens a decoder step can copy: ids [B, P], context vectors [B, P, hidden], mask [B, P]."""

    ids: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor


class CopyHead(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden_size, hidden_size, bias=False)
        self.gate = nn.Linear(hidden_size, 1)
        self.follow_bonus = nn.Parameter(torch.tensor(2.0))

    def copy_attention(self, hidden: torch.Tensor, last_token: torch.Tensor, source: CopySource) -> torch.Tensor:
        """a [B, T, P]: where each of T steps (hidden [B, T, d], last_token [B, T]) copies from."""
        scores = self.query(hidden) @ source.keys.transpose(1, 2) / math.sqrt(hidden.shape[-1])
        previous = F.pad(source.ids, (1, 0), value=-1)[:, :-1]  # x_{j-1}; nothing precedes x_0
        follows = previous[:, None, :] == last_token[:, :, None]
        scores = scores + self.follow_bonus * follows.to(scores.dtype)
        scores = scores.masked_fill(~source.mask.bool()[:, None, :], float("-inf"))
        return scores.float().softmax(dim=-1)

    def forward(
        self, hidden: torch.Tensor, lm_logits: torch.Tensor, last_token: torch.Tensor, source: CopySource
    ) -> torch.Tensor:
        """log p [B, T, V] of the mixture, from hidden [B, T, d] and vocabulary logits [B, T, V]."""
        attention = self.copy_attention(hidden, last_token, source)
        index = source.ids[:, None, :].expand(-1, hidden.shape[1], -1)
        copy = torch.zeros_like(lm_logits, dtype=torch.float32).scatter_add(-1, index, attention)
        gate = self.gate(hidden).float()
        generate = F.logsigmoid(-gate) + torch.log_softmax(lm_logits.float(), dim=-1)
        return torch.logaddexp(generate, F.logsigmoid(gate) + copy.clamp_min(COPY_FLOOR).log())
