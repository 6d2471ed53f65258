"""Cell words: a reader that names what each cell of the image's patch grid shows, as tokens the
decoder can copy (issue 10, item 11).

One reader with weights shared by the P grid cells maps each cell feature to vocabulary logits
through the tied token embedding (LayerNorm -> full-precision linear to the hidden size -> E^T,
plus a per-word bias). It is trained by a multiple-instance bag-of-words loss against the caption's
tokens: the image's logit for a word is its best cell's (max over cells), softmax over the
vocabulary, the caption's token set as a uniform target (VirTex/ICC-style, no box labels). Its
output is read as words: each cell scores words by their term of KL(cell || average cell),
p(w | cell) (log p(w | cell) - running mean of log p(w | cell) over training cells), so words every
caption has and words no cell makes likely score ~0; the `top_cells` best cells give their `words_per_cell` best
words, which join the decoder's copy source, so naming an object becomes copying it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# Effective learning-rate multiplier of the reader's projection (weight stored / GAIN, used * GAIN):
# Adam moves a weight by ~lr per step, so the projection learns GAIN times faster than the trunk;
# 200 sample steps at lr 1e-3 are too few for a multiple-instance reader otherwise.
READER_GAIN = 10.0
PRIOR_MOMENTUM = 0.02


def words_per_cell(total: int, top_cells: int) -> int:
    return max(1, total // top_cells)


class CellReader(nn.Module):
    def __init__(self, feature_dim: int, hidden: int, vocab_size: int, num_words: int, top_cells: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim)
        self.proj = nn.Linear(feature_dim, hidden)
        self.word_bias = nn.Parameter(torch.zeros(vocab_size))
        self.top_cells = top_cells
        self.per_cell = words_per_cell(num_words, top_cells)
        self.rank_positions = nn.Embedding(self.per_cell * top_cells, hidden)
        # Starts uniform: an untrained reader ranks words by p(w | cell) * log(V p(w | cell)).
        self.register_buffer("prior", torch.full((vocab_size,), -math.log(vocab_size)))
        self.register_buffer("prior_steps", torch.zeros((), dtype=torch.long))

    def reset_scale(self, std: float) -> None:
        nn.init.normal_(self.proj.weight, std=std / READER_GAIN)
        nn.init.zeros_(self.proj.bias)

    def logits(self, cells: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Per-cell vocabulary logits [B, P, V] from cell features [B, P, F] and the token table [V, d]."""
        cells = self.norm(cells.to(self.norm.weight.dtype))
        h = F.linear(cells, self.proj.weight * READER_GAIN, self.proj.bias * READER_GAIN)
        return F.linear(h, embedding) + self.word_bias

    @torch.no_grad()
    def update_prior(self, log_probs: torch.Tensor) -> None:
        """Running mean of log p(w | cell) over training cells (the average cell)."""
        rate = max(PRIOR_MOMENTUM, 1.0 / float(self.prior_steps + 1))
        self.prior.mul_(1 - rate).add_(rate * log_probs.mean(dim=(0, 1)))
        self.prior_steps += 1

    def words(self, logits: torch.Tensor) -> torch.Tensor:
        """Word ids [B, top_cells * per_cell], best cell first, each cell's words best first."""
        log_probs = logits.detach().float().log_softmax(dim=-1)
        if self.training:
            self.update_prior(log_probs)
        # Each word's term of KL(cell || average cell): words every cell names score ~0, and so do
        # words no cell makes likely (their ratio is noise).
        score = log_probs.exp() * (log_probs - self.prior)
        top_cells = min(self.top_cells, score.shape[1])
        best, ids = score.topk(self.per_cell, dim=-1)  # [B, P, m]
        cells = best[..., 0].topk(top_cells, dim=-1).indices  # [B, c]
        return ids.gather(1, cells[..., None].expand(-1, -1, self.per_cell)).flatten(1)


def cell_bag_of_words_loss(
    cell_logits: torch.Tensor, caption_ids: torch.Tensor, caption_mask: torch.Tensor, special_ids: tuple[int, ...]
) -> torch.Tensor:
    """Multiple-instance bag of words: max over cells, softmax over the vocabulary, the caption's
    token set (special_ids excluded; the first is the padding id) as a uniform target."""
    image = cell_logits.float().amax(dim=1)  # [B, V]
    pad = special_ids[0]
    target = torch.zeros_like(image).scatter_(1, caption_ids.masked_fill(caption_mask == 0, pad), 1.0)
    target[:, list(special_ids)] = 0.0
    target = target / target.sum(dim=1, keepdim=True).clamp_min(1.0)
    return -(target * image.log_softmax(dim=-1)).sum(dim=-1).mean()


def fit_cell_reader(
    reader: CellReader,
    embedding: torch.Tensor,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    steps: int,
    learning_rate: float,
    special_ids: tuple[int, ...],
) -> list[float]:
    """Warm the reader up alone on (patches, caption_ids, caption_mask) batches before the joint
    steps: it costs a few ms a step against the whole model's hundreds, and a multiple-instance
    reader needs many more steps than the joint schedule gives it. Trains the reader and the
    token table (its output side); returns the loss of every step."""
    params = [p for name, p in reader.named_parameters() if not name.startswith("rank_positions")] + [embedding]
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    reader.train()
    losses = []
    for _ in range(steps):
        patches, caption_ids, caption_mask = next(batches)
        logits = reader.logits(patches, embedding)
        loss = cell_bag_of_words_loss(logits, caption_ids, caption_mask, special_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        reader.update_prior(logits.detach().float().log_softmax(dim=-1))
        losses.append(float(loss.detach()))
    return losses
