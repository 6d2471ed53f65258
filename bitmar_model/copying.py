"""Copying from the task: a pointer-sentinel output head (Merity et al., 2016; See et al., 2017).

The decoder's next-token distribution mixes copying a token of the task it was given with
generating from the vocabulary, one softmax deciding between the task's tokens and a
sentinel that stands for "generate":

    [a_1 .. a_P, a_s] = softmax(q(h) . k_1 + beta f_1, ..., q(h) . k_P + beta f_P,  q(h) . s + beta f_s + b_s)
    p(w)              = a_s * softmax(h E^T)[w] + sum_{j : x_j = w} a_j
    f_j = [x_{j-1} = y_t]      f_s = [x_last = y_t]                       (padding masked)

h is the decoder's last hidden state at step t (dot products scaled by 1/sqrt(d)), E the tied
embedding table, x the task's token ids and k_j their context vectors (token embedding +
learned position, as the decoder's cross-attention reads them), y_t the token just read, s a
learned sentinel key. f is an induction cue: it points at the task token that follows the one
just copied, so a quoted phrase continues in order, and at the sentinel once the task's last
token has been copied, so the quote ends there instead of repeating it. Returned as log p,
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
# Initial sentinel bias: mostly generating (captions copy nothing from their fixed prompt).
SENTINEL_BIAS_INIT = 2.0


@dataclass
class CopySource:
    """The task tokens a decoder step can copy: ids [B, P], context vectors [B, P, hidden], mask [B, P]."""

    ids: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor

    def last_tokens(self) -> torch.Tensor:
        """Each row's last real task token [B] (rows may be left or right padded)."""
        columns = torch.arange(self.mask.shape[1], device=self.mask.device)
        last = (self.mask.bool() * columns).amax(dim=1)
        return self.ids.gather(1, last[:, None])[:, 0]


class CopyHead(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden_size, hidden_size, bias=False)
        self.sentinel = nn.Parameter(torch.zeros(hidden_size))
        self.sentinel_bias = nn.Parameter(torch.tensor(SENTINEL_BIAS_INIT))
        self.follow_bonus = nn.Parameter(torch.tensor(2.0))

    def attention(self, hidden: torch.Tensor, last_token: torch.Tensor, source: CopySource) -> torch.Tensor:
        """[a_1 .. a_P, a_s] as [B, T, P + 1] for T steps (hidden [B, T, d], last_token [B, T])."""
        query = self.query(hidden) / math.sqrt(hidden.shape[-1])
        previous = F.pad(source.ids, (1, 0), value=-1)[:, :-1]  # x_{j-1}; nothing precedes x_0
        follows = previous[:, None, :] == last_token[:, :, None]
        task = query @ source.keys.transpose(1, 2) + self.follow_bonus * follows.to(query.dtype)
        task = task.masked_fill(~source.mask.bool()[:, None, :], float("-inf"))
        ended = (source.last_tokens()[:, None] == last_token).to(query.dtype)
        sentinel = query @ self.sentinel + self.follow_bonus * ended + self.sentinel_bias
        return torch.cat((task, sentinel[..., None]), dim=-1).float().softmax(dim=-1)

    def forward(
        self, hidden: torch.Tensor, lm_logits: torch.Tensor, last_token: torch.Tensor, source: CopySource
    ) -> torch.Tensor:
        """log p [B, T, V] of the mixture, from hidden [B, T, d] and vocabulary logits [B, T, V]."""
        attention = self.attention(hidden, last_token, source)
        index = source.ids[:, None, :].expand(-1, hidden.shape[1], -1)
        copy = torch.zeros_like(lm_logits, dtype=torch.float32).scatter_add(-1, index, attention[..., :-1])
        generate = attention[..., -1:].clamp_min(COPY_FLOOR).log() + torch.log_softmax(lm_logits.float(), dim=-1)
        return torch.logaddexp(generate, copy.clamp_min(COPY_FLOOR).log())
