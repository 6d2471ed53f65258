"""The integer matmul of W1.58A8 inference: int8 activation levels times int8 ternary weights.

`ternary_product(levels, ternary)` returns sum_i levels_i * ternary_i for every token and output,
the `product` that `bitlinear.rescale` turns into the layer output. Two ways compute it, with
the same result in fp32 (integer sums below 2^24 are exact either way, see bitmar_model.bitlinear):

    kernel     torch._int_mm: int8 x int8 -> int32 accumulation, then one cast to the
               activations' dtype. The one integer GEMM PyTorch maintains for both CPU and CUDA.
    fallback   F.linear on the same integers held in the activations' float dtype (the int8
               weight is widened per call; nothing is cached).

The kernel is used only where it exists as a fast kernel and accepts the shape (`int_mm_accepts`):
    CUDA: cuBLASLt refuses rows <= 16 and in/out features that are not multiples of 8.
    CPU:  PyTorch routes _int_mm to oneDNN only on CPUs with AVX512-VNNI; elsewhere it is a
          scalar loop, many times slower than the fallback, so those CPUs always fall back.
Every call is counted (`MatmulCounts`), so a run can say how often the fallback ran. The
measurements behind these choices, and the kernels tried and not taken: docs/decisions.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CUDA_MIN_ROWS = 17  # cuBLASLt int8 GEMM: self.size(0) > 16
CUDA_MULTIPLE = 8  # ... and in/out features multiples of 8
CPU_FAST_INT_MM = bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())


@dataclass
class MatmulCounts:
    """Calls served by the int8 kernel and by the float fallback."""

    kernel: int = 0
    fallback: int = 0

    def add(self, other: MatmulCounts) -> MatmulCounts:
        return MatmulCounts(self.kernel + other.kernel, self.fallback + other.fallback)


def int_mm_accepts(device: torch.device, rows: int, in_features: int, out_features: int) -> bool:
    """Whether torch._int_mm runs ([rows, in] @ [in, out]) as a fast kernel on `device`."""
    if device.type == "cuda":
        return rows >= CUDA_MIN_ROWS and in_features % CUDA_MULTIPLE == 0 and out_features % CUDA_MULTIPLE == 0
    return device.type == "cpu" and CPU_FAST_INT_MM


def ternary_product(levels: torch.Tensor, ternary: torch.Tensor, counts: MatmulCounts) -> torch.Tensor:
    """sum_i levels[..., i] * ternary[o, i] -> [..., out] in levels' dtype.

    levels: integer values in [-128, 127] held as a float tensor [..., in] (quantize_activations);
    ternary: int8 [out, in], values in {-1, 0, 1}. Counts the call in `counts`.
    """
    out_features, in_features = ternary.shape
    flat = levels.reshape(-1, in_features)
    if int_mm_accepts(levels.device, flat.shape[0], in_features, out_features):
        counts.kernel += 1
        # ternary.t() is the column-major [in, out] operand cuBLASLt wants, without a copy.
        product = torch._int_mm(flat.to(torch.int8), ternary.t()).to(levels.dtype)
    else:
        counts.fallback += 1
        product = F.linear(flat, ternary.to(levels.dtype))
    return product.view(*levels.shape[:-1], out_features)
