"""Packed ternary export: exact packing, BitLinear-equal inference, safe save/load, sizes."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bitmar_model.bitlinear import BitLinear, ternarize
from bitmar_model.config import BitMarConfig
from bitmar_model.modeling import BitMarModel
from bitmar_model.packing import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    PackedBitLinear,
    load_packed_into,
    model_bytes_report,
    pack_model,
    pack_ternary,
    read_packed_config,
    round_to_stored,
    save_packed,
    unpack_ternary,
)


def bounded_bitlinear(in_features: int, out_features: int, bias: bool = False, seed: int = 0) -> BitLinear:
    """A BitLinear whose weights all lie within 2x of their absmean scale, about 10% of them zero:
    every ternary value occurs (Gaussian weights are covered separately)."""
    gen = torch.Generator().manual_seed(seed)
    layer = BitLinear(in_features, out_features, bias=bias)
    with torch.no_grad():
        magnitude = 0.6 + 0.8 * torch.rand(out_features, in_features, generator=gen)
        sign = torch.randint(0, 2, (out_features, in_features), generator=gen) * 2 - 1
        keep = torch.rand(out_features, in_features, generator=gen) > 0.1
        layer.weight.copy_(magnitude * sign * keep)
        if bias:
            layer.bias.copy_(torch.randn(out_features, generator=gen))
    return layer.eval()


@pytest.mark.parametrize("shape", [(1,), (3,), (5, 7), (2, 3, 5), (13, 17), (4, 4)])
def test_pack_unpack_round_trip(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(len(shape))
    ternary = torch.randint(-1, 2, shape, generator=gen).float()
    packed = pack_ternary(ternary)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-ternary.numel() // 4)
    assert torch.equal(unpack_ternary(packed, shape), ternary)
    assert torch.equal(unpack_ternary(pack_ternary(ternary.to(torch.int8)), shape, torch.int8), ternary.to(torch.int8))


def test_hand_made_bytes() -> None:
    packed = pack_ternary(torch.tensor([1.0, -1.0, 0.0, 1.0, -1.0]))
    # byte 0: 1 | 2<<2 | 0<<4 | 1<<6 = 73; byte 1: a lone -1 (code 2) then zero padding
    assert packed.tolist() == [73, 2]
    assert pack_ternary(torch.tensor([-1, -1, -1, -1])).tolist() == [0b10101010]


def test_pack_rejects_non_ternary_and_unpack_rejects_bad_codes() -> None:
    with pytest.raises(ValueError, match="outside"):
        pack_ternary(torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="code 3"):
        unpack_ternary(torch.tensor([3], dtype=torch.uint8), (4,))
    with pytest.raises(ValueError, match="bytes"):
        unpack_ternary(torch.tensor([0, 0], dtype=torch.uint8), (4,))


@pytest.mark.parametrize("bias", [False, True])
def test_packed_bitlinear_equals_bitlinear(bias: bool) -> None:
    layer = bounded_bitlinear(33, 19, bias=bias)
    packed = PackedBitLinear.from_bitlinear(layer)
    torch.manual_seed(1)
    for x in (torch.randn(5, 33), torch.randn(2, 7, 33) * 40, torch.randn(3, 33) * 1e-3):
        with torch.no_grad():
            assert torch.equal(packed(x), layer(x))
    assert torch.equal(packed.ternary_weight(), ternarize(layer.weight)[0])


def test_packed_bitlinear_bf16() -> None:
    layer = bounded_bitlinear(32, 16, bias=True)
    packed = PackedBitLinear.from_bitlinear(layer)
    x = torch.randn(2, 3, 32).to(torch.bfloat16)
    with torch.no_grad():
        out = packed(x)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, layer(x), atol=0, rtol=0)
        layer16 = layer.to(torch.bfloat16)
        assert torch.equal(PackedBitLinear.from_bitlinear(layer16)(x), layer16(x))


def test_packed_bitlinear_equals_bitlinear_for_gaussian_weights() -> None:
    torch.manual_seed(2)
    layer = BitLinear(64, 48).eval()
    nn.init.normal_(layer.weight, std=0.05)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(PackedBitLinear.from_bitlinear(layer)(x), layer(x))


def test_loaded_state_replaces_the_int8_weights() -> None:
    a = PackedBitLinear.from_bitlinear(bounded_bitlinear(8, 4, seed=1))
    b = PackedBitLinear.from_bitlinear(bounded_bitlinear(8, 4, seed=2))
    x = torch.randn(2, 8)
    before = a(x)
    assert set(a.state_dict()) == {"packed_weight", "weight_scale"}  # the codes, not the int8 tensor
    a.load_state_dict(b.state_dict())
    assert not torch.equal(a(x), before)
    assert torch.equal(a(x), b(x))


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        bounded_bitlinear(12, 24, bias=True, seed=seed),
        nn.GELU(),
        nn.LayerNorm(24),
        bounded_bitlinear(24, 6, seed=seed + 1),
    )
    return model.eval()


def test_pack_model_equals_original() -> None:
    model = small_model()
    packed = pack_model(model)
    assert isinstance(model[0], BitLinear), "the original must be left untouched"
    assert isinstance(packed[0], PackedBitLinear) and isinstance(packed[3], PackedBitLinear)
    assert isinstance(packed[2], nn.LayerNorm)
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))


def test_save_load_round_trip(tmp_path) -> None:
    model = small_model()
    config = {"dims": [12, 24, 6], "name": "tiny"}
    save_packed(model, tmp_path, config)
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert saved["packed_layers"]["0"]["shape"] == [24, 12]
    assert read_packed_config(tmp_path) == config

    target = pack_model(small_model(seed=5))
    assert load_packed_into(target, tmp_path) == config
    assert target[0].bias.dtype == torch.float32  # fp16 on disk, the model's dtype in memory
    # The file holds the biases and norms in fp16: the loaded model computes exactly what the
    # trained model computes with those tensors rounded, and nearly what it computes as is.
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert torch.equal(target(x), round_to_stored(model)(x))
        torch.testing.assert_close(target(x), model(x), atol=2e-3, rtol=1e-3)
        assert torch.equal(round_to_stored(model)[0].weight, model[0].weight)  # latent weights kept


def test_tied_parameters_are_stored_once(tmp_path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.proj = BitLinear(8, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    save_packed(model, tmp_path, {})
    target = pack_model(Tied())
    load_packed_into(target, tmp_path)
    assert target.head.weight is target.embed.weight
    assert torch.equal(target.embed.weight, model.embed.weight.half().float())


def corrupt(path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_tampered_weights_are_refused(tmp_path, damage: str) -> None:
    save_packed(small_model(), tmp_path, {})
    weights = tmp_path / WEIGHTS_FILE
    if damage == "flip":
        corrupt(weights, weights.stat().st_size - 3)
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-10])
    else:
        weights.unlink()
    target = pack_model(small_model(seed=3))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=WEIGHTS_FILE):
        load_packed_into(target, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_broken_config_and_mismatched_model_are_refused(tmp_path) -> None:
    save_packed(small_model(), tmp_path, {})
    wrong_shape = pack_model(nn.Sequential(BitLinear(12, 25), nn.GELU(), nn.LayerNorm(25), BitLinear(25, 6)))
    with pytest.raises(ValueError, match=r"packed layer '0'.*shape"):
        load_packed_into(wrong_shape, tmp_path)
    extra_layer = pack_model(nn.Sequential(*small_model(), BitLinear(6, 6)))
    with pytest.raises(ValueError, match="packed layer '4'"):
        load_packed_into(extra_layer, tmp_path)
    missing_norm = pack_model(nn.Sequential(*list(small_model())[:2], nn.Identity(), small_model()[3]))
    with pytest.raises(ValueError, match=rf"{WEIGHTS_FILE}.*unexpected keys \['2.bias', '2.weight'\]"):
        load_packed_into(missing_norm, tmp_path)

    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=CONFIG_FILE):
        load_packed_into(pack_model(small_model()), tmp_path)


def test_bytes_report() -> None:
    model = nn.Sequential()
    model.add_module("encoder", BitLinear(256, 512, bias=True))
    model.add_module("norm", nn.LayerNorm(512))
    model.add_module("decoder", BitLinear(512, 128))
    report = model_bytes_report(model)
    bit = report["bitlinear"]
    assert bit["num_elements"] == 256 * 512 + 512 * 128
    assert bit["fp32_bytes"] == 4 * bit["num_elements"]
    assert bit["packed_bytes"] == bit["num_elements"] // 4 + 2 * 4
    assert bit["packed_bytes"] <= bit["fp32_bytes"] / 15
    assert report["other"]["num_elements"] == 512 + 2 * 512
    assert report["other"]["packed_bytes"] == 2 * report["other"]["num_elements"]
    assert set(report["components"]) == {"encoder", "norm", "decoder"}
    assert report["components"]["encoder"]["num_elements"] == 256 * 512 + 512
    assert sum(c["packed_bytes"] for c in report["components"].values()) == report["total"]["packed_bytes"]

    packed_report = model_bytes_report(pack_model(model))
    assert packed_report["bitlinear"] == bit
    assert packed_report["total"] == report["total"]


def test_reported_packed_bytes_are_the_bytes_written(tmp_path) -> None:
    torch.manual_seed(0)
    model = BitMarModel(BitMarConfig.tiny()).eval()
    path = save_packed(model, tmp_path, model.config.to_dict())
    raw = path.read_bytes()
    # A safetensors file is an 8-byte length, a JSON header (names, dtypes, offsets) and
    # the tensor data; the report counts the data.
    header = 8 + int.from_bytes(raw[:8], "little")
    assert len(raw) - header == model_bytes_report(model)["total"]["packed_bytes"]
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["float_dtype"] == "float16"
