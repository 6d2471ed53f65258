"""BitLinear as in BitNet b1.58 (Ma et al., 2024, "The Era of 1-bit LLMs").

Weights are quantized to {-1, 0, +1} times a per-tensor absmean scale; activations are
quantized per token to 8 bits with an absmax scale, after an RMS normalisation (the
"SubLN" placement of BitNet). Training keeps full-precision latent weights and passes
gradients through the rounding with the straight-through estimator (STE), so the
forward pass sees exactly the values an edge runtime would, while the optimizer still
moves the latent weights by small steps.

The product is computed on the integers first and scaled after,

    y = (sum_i levels_i * ternary_i) * (gamma / s) + bias,

levels = RoundClip(x * s, -128, 127) with the per-token scale s and ternary, gamma from
`ternarize`. Each term is an integer with |term| <= 128, so for in_features <= 2^17 every
partial sum is an integer below 2^24 and the fp32 sum is exact in any summation order (and
exact on TF32 tensor cores too: the inputs have at most 8 significant bits). An int32
accumulation (`bitmar_model.packing.PackedBitLinear`) therefore gives the same fp32 product,
and both then apply the same `rescale`, so integer inference equals this layer bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-8
SCALE_MIN, SCALE_MAX = 1e-5, 1e3
ACTIVATION_LIMIT = 1e6
ACTIVATION_LEVELS = 127.0  # signed 8-bit: [-128, 127], absmax maps to 127
_PLACEHOLDER_DEVICE: ContextVar[str | None] = ContextVar("bitlinear_placeholder_device", default=None)


def weight_scale(weight: torch.Tensor) -> torch.Tensor:
    """Absmean scale gamma = mean(|W|), clamped so an all-zero or exploding layer stays finite."""
    return weight.abs().mean().clamp(SCALE_MIN, SCALE_MAX)


def ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (ternary values in {-1, 0, 1} as the weight dtype, absmean scale).

    RoundClip(W / (gamma + eps), -1, 1) from the paper; W is approximated by ternary * gamma.
    """
    scale = weight_scale(weight)
    ternary = (weight / (scale + EPS)).round().clamp(-1, 1)
    return ternary, scale


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax 8-bit quantization. Returns (integer levels as x's dtype, per-token scale)."""
    x = x.clamp(-ACTIVATION_LIMIT, ACTIVATION_LIMIT)
    absmax = x.abs().amax(dim=-1, keepdim=True)
    # In place on fresh intermediates: the same values, two allocations fewer per call.
    scale = (ACTIVATION_LEVELS / (absmax + EPS)).clamp_(SCALE_MIN, SCALE_MAX)
    levels = (x * scale).round_().clamp_(-ACTIVATION_LEVELS - 1, ACTIVATION_LEVELS)
    return levels, scale


def quantize_activations_ste(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels, s) of `quantize_activations` with a straight-through gradient d levels / d x = s.

    (x - x.detach()) is exactly zero with an identity gradient, so the forward value is the
    integer levels bit for bit, and through `rescale` d y / d x = ternary * gamma: the gradient
    of the dequantized x_q = levels / s that BitNet's STE passes. s itself is detached.
    """
    levels, scale = quantize_activations(x.detach())
    if not (torch.is_grad_enabled() and x.requires_grad):
        return levels, scale  # inference: the STE term is zero, skip its three passes over x
    return levels + (x - x.detach()) * scale, scale


def ternarize_ste(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ternary, gamma) of `ternarize` with a straight-through gradient d ternary / d W = 1 / gamma.

    Through `rescale`, d y / d W = levels / s = x_q, the STE gradient of W ~ ternary * gamma;
    gamma itself is detached, as the absmean scale passes no gradient in BitNet.
    """
    ternary, scale = ternarize(weight.detach())
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return ternary, scale
    return ternary + (weight - weight.detach()) / scale, scale


def rescale(
    product: torch.Tensor, weight_scale: torch.Tensor, activation_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = product * (gamma / s) + bias, product = sum_i levels_i * ternary_i (exact, see the module
    docstring). One place for the order of the scale operations, which bit-exactness depends on."""
    y = product * (weight_scale / activation_scale)
    return y if bias is None else y + bias.to(y.dtype)


@dataclass(frozen=True)
class BitLinearStats:
    """Cheap per-layer quantization statistics (read without a forward pass)."""

    zero_fraction: float
    plus_fraction: float
    minus_fraction: float
    scale: float
    num_weights: int

    @property
    def plus_minus_balance(self) -> float:
        """+1 share among non-zero weights: 0.5 is perfectly balanced."""
        nonzero = self.plus_fraction + self.minus_fraction
        return self.plus_fraction / nonzero if nonzero > 0 else 0.5


class BitLinear(nn.Linear):
    """Drop-in replacement for nn.Linear with ternary weights and 8-bit activations.

    The input is RMS-normalised (no learned gain: the gain would be folded into the
    quantization scale anyway) before activation quantization, as BitNet prescribes, so
    activation statistics are stable whatever the residual stream's magnitude.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, **kwargs) -> None:
        if _PLACEHOLDER_DEVICE.get() is not None:
            kwargs.setdefault("device", _PLACEHOLDER_DEVICE.get())
        super().__init__(in_features, out_features, bias=bias, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_weight(x, *ternarize_ste(self.weight))

    def forward_with_weight(self, x: torch.Tensor, ternary: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        """The forward with the ternarized weight supplied (generation ternarizes once per call,
        `layers.frozen_bitlinear_weights`): rescale(levels @ ternary^T, gamma, s, bias)."""
        x = F.rms_norm(x, (self.in_features,), eps=EPS)
        levels, scale = quantize_activations_ste(x)
        return rescale(F.linear(levels, ternary.to(levels.dtype)), weight_scale, scale, self.bias)

    @torch.no_grad()
    def quantization_stats(self) -> BitLinearStats:
        ternary, scale = ternarize(self.weight.float())
        n = ternary.numel()
        return BitLinearStats(
            zero_fraction=float((ternary == 0).sum()) / n,
            plus_fraction=float((ternary > 0).sum()) / n,
            minus_fraction=float((ternary < 0).sum()) / n,
            scale=float(scale),
            num_weights=n,
        )


@contextmanager
def placeholder_weights() -> Iterator[None]:
    """BitLinear layers built inside the block hold meta-device weights: no memory, no initialisation.
    For a model whose BitLinears are replaced before use (`packing.packed_skeleton`), so loading a
    packed model never allocates the fp32 latent weights it does not keep."""
    token = _PLACEHOLDER_DEVICE.set("meta")
    try:
        yield
    finally:
        _PLACEHOLDER_DEVICE.reset(token)


def bitlinear_stats(model: nn.Module) -> dict[str, BitLinearStats]:
    """Statistics of every BitLinear in `model`, keyed by module name."""
    return {name: m.quantization_stats() for name, m in model.named_modules() if isinstance(m, BitLinear)}
