"""quantization_report: layer statistics, sizes, packed vs trained agreement, latency."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bitmar_model.bitlinear import BitLinear, ternarize
from bitmar_model.config import BitMarConfig
from bitmar_model.modeling import BitMarModel
from bitmar_pipeline.release.quantization import (
    REPORT_FILE,
    QuantizationReport,
    build_quantization_report,
    cpu_latency,
    dense_equivalent,
    layer_table,
    weight_totals,
)
from tests.factories import make_storage


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> QuantizationReport:
    storage = make_storage(tmp_path_factory.mktemp("quant"))
    return build_quantization_report(storage, max_tasks=4, decode_tokens=8, latency_runs=3)


def test_report_file_layers_and_totals(report: QuantizationReport) -> None:
    assert json.loads(report.path.read_text()) == json.loads(json.dumps(report.report, default=float))
    assert report.path.name == REPORT_FILE and report.figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    layers = report.layers
    assert len(layers) == sum(isinstance(m, BitLinear) for m in BitMarModel(BitMarConfig.tiny()).modules())
    shares = layers["zero_fraction"] + layers["plus_fraction"] + layers["minus_fraction"]
    assert ((shares - 1).abs() < 1e-3).all() and (layers["scale"] > 0).all()
    totals = report.report["totals"]
    assert totals["ternary_weights"] == int(layers["weights"].sum())
    assert 0 < totals["zero_fraction"] < 1 and 0 < totals["plus_minus_balance"] < 1
    sizes = report.report["sizes"]
    assert sizes["fp32_bytes"] > sizes["fp16_bytes"] > sizes["packed_bytes"] > 0


def test_packed_form_agrees_with_the_trained_model(report: QuantizationReport) -> None:
    agreement = report.report["agreement"]
    packed, dense = agreement["packed_vs_fake_quant"], agreement["dense_fp32_vs_fake_quant"]
    assert packed["tasks"] == 3 and packed["decoder_tokens"] > 0  # the three test-split tasks
    # The integer form sums the same integers and scales them in the same order: bit for bit.
    assert packed["exactly_equal"] and packed["robot_probs_max_abs_diff"] == 0.0
    # The release stores embeddings, norms and biases in fp16: a small, measured difference.
    fp16 = agreement["fp16_storage_vs_fp32"]
    assert 0 < fp16["robot_probs_max_abs_diff"] < 1e-2 and fp16["robot_top1_agreement"] == 1.0
    # Dropping activation quantization changes the function: the dense model is a cost baseline.
    assert not dense["exactly_equal"] and dense["logits_max_abs_diff"] > 0


def test_latency_reports_every_form(report: QuantizationReport) -> None:
    models = report.report["latency"]["models"]
    assert set(models) == {"fake_quant", "integer", "dense_fp32"}
    assert all(m["median_ms"] > 0 and m["runs"] == 3 and m["meaning"] for m in models.values())
    assert models["fake_quant"]["relative_to_fake_quant"] == 1.0


def test_integer_form_weight_bytes_and_matmul_calls(report: QuantizationReport) -> None:
    integer = report.report["integer"]
    weights = integer["weight_bytes"]
    # One int8 byte per ternary weight (a quarter of fp32) plus a 4-byte fp32 scale per layer.
    layers = report.report["totals"]["bitlinear_layers"]
    assert weights["integer_int8"] == weights["fake_quant_fp32"] // 4 + 4 * layers
    assert integer["matmul_calls"]["kernel"] + integer["matmul_calls"]["fallback"] > 0


def test_dense_equivalent_holds_the_dequantized_weights() -> None:
    torch.manual_seed(0)
    model = BitMarModel(BitMarConfig.tiny()).eval()
    dense = dense_equivalent(model)
    assert not any(isinstance(m, BitLinear) for m in dense.modules())
    layer, dense_layer = model.encoder.layers[0].attn.q_proj, dense.encoder.layers[0].attn.q_proj
    assert type(dense_layer) is nn.Linear
    ternary, scale = ternarize(layer.weight)
    assert torch.equal(dense_layer.weight, ternary * scale)
    assert torch.equal(dense.embed_tokens.weight, model.embed_tokens.weight)


def test_latency_runs_are_interleaved() -> None:
    calls: list[str] = []

    class Recorder(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, **batch: torch.Tensor) -> None:
            calls.append(self.name)

    result = cpu_latency({"a": Recorder("a"), "b": Recorder("b")}, {"x": torch.zeros(1)}, runs=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then alternating runs
    assert set(result) == {"a", "b"} and result["a"]["runs"] == 3


def test_totals_weight_layers_by_size() -> None:
    model = nn.Sequential(BitLinear(4, 4), BitLinear(8, 8))
    with torch.no_grad():
        model[0].weight.fill_(1.0)  # all +1
        model[1].weight.copy_(torch.tensor([[1.0, -1.0] * 4] * 8))  # half +1, half -1
    totals = weight_totals(layer_table(model))
    assert totals["ternary_weights"] == 80
    assert totals["plus_fraction"] == pytest.approx((16 + 32) / 80, abs=1e-4)
    assert totals["minus_fraction"] == pytest.approx(32 / 80, abs=1e-4)


def test_model_without_bitlinear_is_refused() -> None:
    with pytest.raises(ValueError, match="no BitLinear"):
        layer_table(nn.Sequential(nn.Linear(2, 2)))


def test_report_needs_test_tasks(tmp_path: Path) -> None:
    storage = make_storage(tmp_path)
    tasks = storage.read_partition("robot_tasks", "all")
    storage.write_partition("robot_tasks", "all", tasks[tasks["split"] != "test"])
    with pytest.raises(ValueError, match="no 'test' rows"):
        build_quantization_report(storage, max_tasks=2, decode_tokens=4, latency_runs=1)
