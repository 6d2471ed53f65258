"""Transformer building blocks shared by the encoder, vision adapter, fusion, reasoning and decoder.

Every projection inside attention and MLP blocks is a BitLinear (or nn.Linear when
`quantized=False`, for ablations). Masks are boolean with True meaning "may attend", the
convention of F.scaled_dot_product_attention, shaped [B, 1, Tq, Tk].
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from bitmar_model.bitlinear import BitLinear, ternarize


def make_linear(in_features: int, out_features: int, *, quantized: bool, bias: bool = False) -> nn.Linear:
    """The projection used in attention and MLP blocks: BitLinear, or nn.Linear for the fp baseline."""
    return (BitLinear if quantized else nn.Linear)(in_features, out_features, bias=bias)


@contextmanager
def frozen_bitlinear_weights(module: nn.Module) -> Iterator[None]:
    """Within the block, every BitLinear of `module` uses a weight quantized once on entry.

    BitLinear re-ternarizes its latent weight on every call, which is right for training
    but, during generation, repeats identical work hundreds of times and dominates a
    cached decoding step on CPU. Outputs are bit-identical to BitLinear.forward as long as
    the weights do not change inside the block (generation runs under no_grad), so the
    cache lives exactly as long as the block and can never go stale afterwards.
    Subclasses that override forward are left alone.
    """
    layers = [m for m in module.modules() if isinstance(m, BitLinear) and type(m).forward is BitLinear.forward]
    try:
        for layer in layers:
            with torch.no_grad():
                ternary, scale = ternarize(layer.weight)
            layer.forward = partial(layer.forward_with_weight, ternary=ternary, weight_scale=scale)
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Absolute position of each token counted over real tokens only, so left and right
    padding give every sequence the positions it would have alone (pads get 0 or their
    predecessor's position; they are masked as keys anyway)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer), computed from explicit absolute positions.

    Positions are passed in rather than inferred from sequence length, so cached decoding,
    padding and a trimmed sliding-window cache all rotate each token by its true position.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> (cos, sin), each [B, 1, T, head_dim] (broadcast over heads)."""
        freqs = positions.float()[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def key_padding_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """[B, Tk] bool -> [B, 1, 1, Tk]. A row with no valid key (an all-padding sequence) may
    attend everywhere: its output is ignored, but a fully masked softmax would be NaN."""
    key_valid = key_valid.bool()
    key_valid = key_valid | ~key_valid.any(-1, keepdim=True)
    return key_valid[:, None, None, :]


def causal_window_mask(
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    key_valid: torch.Tensor,
    sink_tokens: int,
    window: int,
) -> torch.Tensor:
    """Causal mask with attention sinks and a sliding window, from absolute positions.

    Key k is visible to query q when it is a real token, not in the future, and either one
    of the first `sink_tokens` positions or within the last `window` positions (q included).
    Written over positions rather than indices, so the same rule holds for a full sequence
    (training), a padded batch and a trimmed KV cache (generation): cached decoding equals
    recomputing the whole sequence. Returns [B, 1, Tq, Tk] bool.
    """
    q = query_positions[:, :, None]
    k = key_positions[:, None, :]
    allowed = key_valid.bool()[:, None, :] & (k <= q) & ((k < sink_tokens) | (q - k < window))
    # Padding queries (position 0 of a left-padded row) may see nothing; let them see
    # everything instead of producing NaN. Their outputs are never used.
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed[:, None]


@dataclass
class AttentionOutput:
    hidden_states: torch.Tensor  # [B, Tq, hidden]
    key: torch.Tensor  # [B, H, Tk, head_dim], rotated; what a cache stores
    value: torch.Tensor  # [B, H, Tk, head_dim]
    weights: torch.Tensor | None  # [B, H, Tq, Tk], only when requested


class MultiHeadAttention(nn.Module):
    """Multi-head (self or cross) attention with BitLinear q/k/v/o projections.

    Uses F.scaled_dot_product_attention (fused kernels) unless attention weights are
    requested; only then are the scores materialised explicitly.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        context_size: int | None = None,
        dropout: float = 0.0,
        quantized: bool = True,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.dropout = dropout
        context_size = context_size or hidden_size
        self.q_proj = make_linear(hidden_size, hidden_size, quantized=quantized)
        self.k_proj = make_linear(context_size, hidden_size, quantized=quantized)
        self.v_proj = make_linear(context_size, hidden_size, quantized=quantized)
        self.o_proj = make_linear(hidden_size, hidden_size, quantized=quantized)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def project_key_value(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a context, for cross-attention caches (computed once per generation)."""
        return self._split_heads(self.k_proj(source)), self._split_heads(self.v_proj(source))

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        attn_mask: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        output_attentions: bool = False,
    ) -> AttentionOutput:
        """Attend from `hidden_states` to `context` (cross) or to itself (self, context=None).

        rotary: (cos, sin) of the query positions; self-attention only, applied to the new
            keys too, before they are cached.
        past_key_value: cached (already rotated) keys/values prepended to the new ones.
        key_value: precomputed context keys/values (cross-attention cache); skips k/v projections.
        """
        q = self._split_heads(self.q_proj(hidden_states))
        if key_value is not None:
            k, v = key_value
        else:
            k, v = self.project_key_value(hidden_states if context is None else context)
            if rotary is not None:
                k = apply_rotary(k, *rotary)
            if past_key_value is not None:
                k = torch.cat((past_key_value[0], k), dim=2)
                v = torch.cat((past_key_value[1], v), dim=2)
        if rotary is not None:
            q = apply_rotary(q, *rotary)

        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if output_attentions:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, p=dropout_p) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        b, _, t, _ = out.shape
        out = self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
        return AttentionOutput(hidden_states=out, key=k, value=v, weights=weights)


class FeedForward(nn.Module):
    """SwiGLU (LLaMA/BitNet b1.58) or GELU MLP with BitLinear projections."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        activation: str = "swiglu",
        dropout: float = 0.0,
        quantized: bool = True,
    ) -> None:
        super().__init__()
        self.activation = activation
        # SwiGLU needs two input projections (gate and up); fusing them into one BitLinear
        # halves the per-call activation quantization work. They then share one absmean
        # scale, which is harmless: both see the same input and are trained jointly.
        up_width = 2 * intermediate_size if activation == "swiglu" else intermediate_size
        self.up_proj = make_linear(hidden_size, up_width, quantized=quantized)
        self.down_proj = make_linear(intermediate_size, hidden_size, quantized=quantized)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up_proj(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.down_proj(self.dropout(h))


@dataclass
class KVCache:
    """Self-attention cache of a decoder: per-layer rotated keys and values, plus the
    absolute position and validity of each cached slot (shared by all layers).

    Keys are stored already rotated by their absolute positions, so dropping slots (the
    sliding window) never changes the remaining keys and queries keep using absolute
    positions: relative distances stay exact. The alternative (StreamingLLM's re-indexing
    of positions inside the cache) would make cached decoding differ from recomputing the
    same sequence, which the training-time mask reproduces exactly with this choice.
    """

    keys: list[torch.Tensor]  # per layer [B, H, S, head_dim]
    values: list[torch.Tensor]
    positions: torch.Tensor  # [B, S] long
    valid: torch.Tensor  # [B, S] bool

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    def trimmed(self, sink_tokens: int, window: int) -> KVCache:
        """Drop slots no future query can see, keeping at most sink_tokens + window per layer.

        Future queries sit at positions > the newest position of each row, so a slot stays
        useful only if it is a sink or inside the window of the next query. Rows may keep
        different slots (padding differs per row): kept slots are compacted to the left in
        order, and the width is the largest per-row count.
        """
        if self.length <= sink_tokens + window:
            return self
        next_position = torch.where(self.valid, self.positions, -1).amax(dim=1, keepdim=True) + 1
        keep = self.valid & ((self.positions < sink_tokens) | (next_position - self.positions < window))
        width = int(keep.sum(dim=1).max())
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
        gather = order[:, None, :, None]

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.gather(2, gather.expand(-1, t.shape[1], -1, t.shape[3]))

        return KVCache(
            keys=[take(k) for k in self.keys],
            values=[take(v) for v in self.values],
            positions=self.positions.gather(1, order),
            valid=keep.gather(1, order),
        )
