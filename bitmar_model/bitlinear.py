"""BitLinear as in BitNet b1.58 (Ma et al., 2024, "The Era of 1-bit LLMs").

Weights are quantized to {-1, 0, +1} times a per-tensor absmean scale; activations are
quantized per token to 8 bits with an absmax scale, after an RMS normalisation (the
"SubLN" placement of BitNet). Training keeps full-precision latent weights and passes
gradients through the rounding with the straight-through estimator (STE), so the
forward pass sees exactly the values an edge runtime would, while the optimizer still
moves the latent weights by small steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-8
SCALE_MIN, SCALE_MAX = 1e-5, 1e3
ACTIVATION_LIMIT = 1e6
ACTIVATION_LEVELS = 127.0  # signed 8-bit: [-128, 127], absmax maps to 127


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
    scale = (ACTIVATION_LEVELS / (absmax + EPS)).clamp(SCALE_MIN, SCALE_MAX)
    levels = (x * scale).round().clamp(-ACTIVATION_LEVELS - 1, ACTIVATION_LEVELS)
    return levels, scale


def fake_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize activations with an STE, so gradients flow as if unquantized."""
    levels, scale = quantize_activations(x)
    # (x - x.detach()) is exactly zero with an identity gradient; adding the detached
    # quantized value keeps the forward bit-exact (x + (q - x) can be off by one ulp).
    return (x - x.detach()) + (levels / scale).detach()


def fake_quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize the latent weight with an STE."""
    ternary, scale = ternarize(weight)
    return (weight - weight.detach()) + (ternary * scale).detach()


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
        super().__init__(in_features, out_features, bias=bias, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(x, (self.in_features,), eps=EPS)
        x_q = fake_quantize_activations(x)
        w_q = fake_quantize_weight(self.weight)
        return F.linear(x_q, w_q.to(x_q.dtype), None if self.bias is None else self.bias.to(x_q.dtype))

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


def bitlinear_stats(model: nn.Module) -> dict[str, BitLinearStats]:
    """Statistics of every BitLinear in `model`, keyed by module name."""
    return {name: m.quantization_stats() for name, m in model.named_modules() if isinstance(m, BitLinear)}
