"""Copying from the task: a pointer-sentinel output head (Merity et al., 2016; See et al., 2017).

The decoder's next-token distribution mixes copying a token of the task it was given with
generating from the vocabulary, one softmax deciding between the task's tokens and a
sentinel that stands for "generate":

    [a_1 .. a_P, a_s] = softmax(q(h) . k_1 + c_1, ..., q(h) . k_P + c_P,  q(h) . s + c_s + b_s)
    p(w)              = a_s * softmax(h E^T)[w] + sum_{j : x_j = w} a_j
    c_j = beta_1 [x_{j-1} = y_t] + beta_2 [x_{j-2} x_{j-1} = y_{t-1} y_t]      (padding masked)
    c_s = beta_1 [x_last = y_t]  + beta_2 [x_{last-1} x_last = y_{t-1} y_t]

h is the decoder's last hidden state at step t (dot products scaled by 1/sqrt(d)), E the tied
embedding table, x the task's token ids and k_j their context vectors (token embedding +
learned position, as the decoder's cross-attention reads them), y_t the token just read and
y_{t-1} the one before it, s a learned sentinel key. c is an induction cue: it points at the
task token that follows the one just copied, so a quoted phrase continues in order (strongly
once two tokens in a row match the task: inside a quote, where a single common token such as
" to" would also match elsewhere), and at the sentinel once the task's last token has been
copied, so the quote ends there instead of repeating. Returned as log p, which works
everywhere logits do (softmax, sampling, cross-entropy, GRPO log-probs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

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
    # Leading tokens that are not a phrase (the image's cell words, bitmar_model.cell_words): no
    # induction cue points at them, nor from them at the first task token.
    unphrased: int = 0

    @cached_property
    def ending(self) -> torch.Tensor:
        """Each row's last two real task tokens [B, 2] (x_{last-1}, x_last); -1 where there is none.
        Cached: the task is fixed while a decoder step reads it once per generated token."""
        columns = torch.arange(self.mask.shape[1], device=self.mask.device)
        real = self.mask.bool()
        last = (real * columns).amax(dim=1, keepdim=True)
        before = (last - 1).clamp_min(0)
        has_before = (last >= 1) & real.gather(1, before)
        before_ids = torch.where(has_before, self.ids.gather(1, before), -1)
        return torch.cat((before_ids, self.ids.gather(1, last)), dim=1)


def read_tokens(decoder_input_ids: torch.Tensor) -> torch.Tensor:
    """(y_{t-1}, y_t) for every decoder position [B, T] -> [B, T, 2]; -1 before the first token."""
    before = F.pad(decoder_input_ids, (1, 0), value=-1)[:, :-1]
    return torch.stack((before, decoder_input_ids), dim=-1)


class CopyHead(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden_size, hidden_size, bias=False)
        self.sentinel = nn.Parameter(torch.zeros(hidden_size))
        self.sentinel_bias = nn.Parameter(torch.tensor(SENTINEL_BIAS_INIT))
        self.follow_bonus = nn.Parameter(torch.tensor(2.0))  # beta_1
        self.bigram_bonus = nn.Parameter(torch.tensor(6.0))  # beta_2: a scalar moves < 1 in 400 SFT steps

    def _cue(self, match_last: torch.Tensor, match_before: torch.Tensor) -> torch.Tensor:
        return self.follow_bonus * match_last + self.bigram_bonus * (match_last & match_before)

    def attention(self, hidden: torch.Tensor, read: torch.Tensor, source: CopySource) -> torch.Tensor:
        """[a_1 .. a_P, a_s] as [B, T, P + 1] for T steps (hidden [B, T, d], read [B, T, 2] = (y_{t-1}, y_t))."""
        query = self.query(hidden) / math.sqrt(hidden.shape[-1])
        before, last = read[..., :1], read[..., 1:]  # [B, T, 1]
        ids = source.ids
        if source.unphrased:
            ids = ids.clone()
            ids[:, : source.unphrased] = -1
        x_prev = F.pad(ids, (1, 0), value=-1)[:, None, :-1]  # x_{j-1}; nothing precedes x_0
        x_prev2 = F.pad(ids, (2, 0), value=-1)[:, None, :-2]  # x_{j-2}
        task = query @ source.keys.transpose(1, 2) + self._cue(x_prev == last, x_prev2 == before)
        task = task.masked_fill(~source.mask.bool()[:, None, :], float("-inf"))
        ending = source.ending[:, None, :]  # [B, 1, 2]
        cue = self._cue(ending[..., 1:] == last, ending[..., :1] == before)[..., 0]
        sentinel = query @ self.sentinel + cue + self.sentinel_bias
        return torch.cat((task, sentinel[..., None]), dim=-1).float().softmax(dim=-1)

    def forward(
        self, hidden: torch.Tensor, lm_logits: torch.Tensor, read: torch.Tensor, source: CopySource
    ) -> torch.Tensor:
        """log p [B, T, V] of the mixture, from hidden [B, T, d], vocabulary logits [B, T, V] and
        the tokens just read [B, T, 2] (`read_tokens`)."""
        attention = self.attention(hidden, read, source)
        index = source.ids[:, None, :].expand(-1, hidden.shape[1], -1)
        copy = torch.zeros_like(lm_logits, dtype=torch.float32).scatter_add(-1, index, attention[..., :-1])
        generate = attention[..., -1:].clamp_min(COPY_FLOOR).log() + torch.log_softmax(lm_logits.float(), dim=-1)
        return torch.logaddexp(generate, copy.clamp_min(COPY_FLOOR).log())
