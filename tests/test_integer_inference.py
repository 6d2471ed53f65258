"""W1.58A8 integer inference: equal to the fake-quant model bit for bit, int8 weights, counted
fallbacks, the STE gradients BitLinear had before its integer-first forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bitmar_model.integer as integer
from bitmar_model.bitlinear import EPS, BitLinear, quantize_activations, ternarize
from bitmar_model.config import BitMarConfig
from bitmar_model.integer import MatmulCounts, int_mm_accepts
from bitmar_model.modeling import BitMarModel
from bitmar_model.packing import PackedBitLinear, held_weight_bytes, matmul_counts, pack_model


@pytest.fixture(scope="module")
def models() -> tuple[BitMarModel, BitMarModel]:
    torch.manual_seed(0)
    model = BitMarModel(BitMarConfig.tiny()).eval()  # Gaussian initial weights, not bounded ones
    return model, pack_model(model).eval()


def inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(3, 256, (3, 21), generator=g),
        "vision_features": {"cls": torch.randn(3, 32, generator=g), "patches": torch.randn(3, 4, 32, generator=g)},
        "decoder_input_ids": torch.randint(3, 256, (3, 9), generator=g),
    }


@pytest.mark.parametrize("kernel", [False, True], ids=["fallback", "int_mm"])
def test_integer_model_equals_fake_quant(models, kernel: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # int_mm: torch._int_mm on this CPU (a slow scalar loop without AVX512-VNNI, but exact).
    monkeypatch.setattr(integer, "CPU_FAST_INT_MM", kernel)
    model, packed = models
    before = matmul_counts(packed)
    batch = inputs()
    with torch.no_grad():
        expected, actual = model(**batch), packed(**batch)
        assert torch.equal(actual.logits, expected.logits)
        assert torch.equal(actual.robot_probs, expected.robot_probs)
        generated = packed.generate(batch["input_ids"], vision_features=batch["vision_features"], max_new_tokens=6)
        reference = model.generate(batch["input_ids"], vision_features=batch["vision_features"], max_new_tokens=6)
        assert torch.equal(generated.sequences, reference.sequences)
    after = matmul_counts(packed)
    used, other = (after.kernel - before.kernel, after.fallback - before.fallback)
    assert (used > 0 and other == 0) if kernel else (used == 0 and other > 0)


def test_int_mm_shape_rules() -> None:
    cuda = torch.device("cuda")  # the rule only reads the device type: no GPU needed
    assert int_mm_accepts(cuda, 17, 32, 64)
    assert not int_mm_accepts(cuda, 16, 32, 64)  # cuBLASLt: more than 16 rows
    assert not int_mm_accepts(cuda, 17, 36, 64) and not int_mm_accepts(cuda, 17, 32, 60)  # multiples of 8
    assert int_mm_accepts(torch.device("cpu"), 1, 3, 5) == integer.CPU_FAST_INT_MM


def test_refused_shape_falls_back_and_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    # CUDA's row rule on this CPU: 5 rows are refused, 20 rows go to torch._int_mm.
    monkeypatch.setattr(integer, "int_mm_accepts", lambda device, rows, k, n: rows >= integer.CUDA_MIN_ROWS)
    torch.manual_seed(0)
    layer = BitLinear(40, 24, bias=True).eval()
    packed = PackedBitLinear.from_bitlinear(layer)
    with torch.no_grad():
        for rows, counts in ((5, MatmulCounts(0, 1)), (20, MatmulCounts(1, 1)), (4, MatmulCounts(1, 2))):
            x = torch.randn(rows, 40)
            assert torch.equal(packed(x), layer(x))
            assert packed.counts == counts


def test_weights_are_int8_a_quarter_of_fp32(models) -> None:
    model, packed = models
    layers = [m for m in packed.modules() if isinstance(m, PackedBitLinear)]
    assert layers and all(m.ternary.dtype == torch.int8 for m in layers)
    floats = {name for m in layers for name, t in m.named_buffers() if t.is_floating_point()}
    assert floats == {"weight_scale"}  # no cached float copy of the weight
    assert held_weight_bytes(packed) == held_weight_bytes(model) // 4 + 4 * len(layers)
    # The state dict (the packed file) still carries the 2-bit codes, not the int8 tensor.
    keys = packed.state_dict()
    names = [n for n, m in packed.named_modules() if isinstance(m, PackedBitLinear)]
    assert all(f"{n}.packed_weight" in keys and f"{n}.ternary" not in keys for n in names)


def test_ste_gradients_are_bitnets() -> None:
    """d y / d x = ternary * gamma (through the rms norm), d y / d W = x_q = levels / s, as the
    quantize-dequantize form x_q @ (ternary * gamma)^T passed before the integer-first forward."""
    torch.manual_seed(3)
    layer = BitLinear(48, 20, bias=True)
    x = torch.randn(2, 5, 48, requires_grad=True)
    grad = torch.randn(2, 5, 20)
    layer(x).backward(grad)

    x_ref = x.detach().clone().requires_grad_()
    weight = layer.weight.detach().clone().requires_grad_()
    normed = F.rms_norm(x_ref, (48,), eps=EPS)
    levels, scale = quantize_activations(normed.detach())
    ternary, gamma = ternarize(weight.detach())
    x_q = (normed - normed.detach()) + levels / scale
    w_q = (weight - weight.detach()) + ternary * gamma
    F.linear(x_q, w_q, layer.bias.detach()).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, weight.grad, rtol=1e-5, atol=1e-6)
    assert layer.bias.grad is not None
