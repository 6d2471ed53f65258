"""quantization_report: what the ternary weights look like, how big the model is in each
form, whether the packed edge form computes what the trained model computes, and how fast.

Three forms of the same trained weights are compared:
- fake_quant: the model as trained and evaluated. Every BitLinear re-ternarizes its fp32
  latent weight on each call and quantizes activations to 8 bits.
- integer: the released packed form as `bitmar predict` runs it: `packing.pack_model` of the
  trained weights with the non-ternary tensors rounded to fp16 as `save_packed` stores them
  (`round_to_stored`). Ternary weights held as int8, activations quantized exactly as above,
  integer matmuls (`bitmar_model.integer`: torch._int_mm where it is a fast kernel, else the
  counted float fallback on the same integers; `integer.matmul_calls` says which ran). It is
  meant to compute the function of the fake-quant model holding the same fp16-rounded tensors;
  `agreement.packed_vs_fake_quant` says whether it does, bit for bit, and
  `agreement.fp16_storage_vs_fp32` what the fp16 storage costs against the fp32 trained model.
  `integer.weight_bytes` compares the BitLinear weight memory of the two forms.
  (The earlier packed-fp32 form, codes unpacked into a cached fp32 matrix, no longer exists.)
- dense_fp32: the same architecture with nn.Linear layers holding the dequantized weights
  (ternary * scale), without BitLinear's input RMS norm and activation quantization. It is
  the cost of an ordinary fp32 model of this shape. It is NOT the same function, and not a
  `quantized=False` model either (that one would be trained separately); its agreement
  numbers show how far dropping activation quantization moves the outputs.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from bitmar_model.bitlinear import BitLinear, bitlinear_stats, ternarize
from bitmar_model.integer import CPU_FAST_INT_MM, MatmulCounts
from bitmar_model.io import atomic_write_json
from bitmar_model.modeling import BitMarModel, parameter_report
from bitmar_model.packing import held_weight_bytes, matmul_counts, pack_model, round_to_stored
from bitmar_pipeline.evaluation.figures import weight_distribution_figure
from bitmar_pipeline.storage import Storage
from bitmar_pipeline.training.datasets import TrainingDataError, load_pipeline_tokenizer
from bitmar_pipeline.training.reasoning_targets import format_prompt
from bitmar_pipeline.training.stages import GRPO, STAGE_INFO_FILE, load_stage_model, model_dir

REPORTS_DIR = "reports"
REPORT_FILE = "quantization_report.json"
FIGURE_FILE = "weight_distribution.png"

LATENCY_MEANING = {
    "fake_quant": "the trained model (BitLinear): re-ternarizes fp32 latent weights on every call, 8-bit activations",
    "integer": "the packed file as predicted from: int8 ternary weights, 8-bit activations, integer matmuls",
    "dense_fp32": (
        "nn.Linear with the dequantized weights, no activation quantization: "
        "an ordinary fp32 model of this shape (not the same function)"
    ),
}


@dataclass
class QuantizationReport:
    report: dict[str, Any]  # what REPORT_FILE holds
    layers: pd.DataFrame
    path: Path
    figure: Path


def layer_table(model: nn.Module) -> pd.DataFrame:
    """One row per BitLinear: ternary shares, +1 share among non-zeros, absmean scale."""
    shapes = {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, BitLinear)}
    rows = [
        {
            "layer": name,
            "shape": "x".join(map(str, shapes[name])),
            "weights": s.num_weights,
            "zero_fraction": round(s.zero_fraction, 4),
            "plus_fraction": round(s.plus_fraction, 4),
            "minus_fraction": round(s.minus_fraction, 4),
            "plus_minus_balance": round(s.plus_minus_balance, 4),
            "scale": s.scale,
        }
        for name, s in bitlinear_stats(model).items()
    ]
    if not rows:
        raise ValueError("the model has no BitLinear layers (config.quantized is false): nothing to report")
    return pd.DataFrame(rows)


def weight_totals(layers: pd.DataFrame) -> dict[str, float]:
    """Shares over all ternary weights (weighted by layer size) and the range of scales."""
    n = layers["weights"]
    plus = float((layers["plus_fraction"] * n).sum() / n.sum())
    minus = float((layers["minus_fraction"] * n).sum() / n.sum())
    return {
        "bitlinear_layers": len(layers),
        "ternary_weights": int(n.sum()),
        "zero_fraction": round(float((layers["zero_fraction"] * n).sum() / n.sum()), 4),
        "plus_fraction": round(plus, 4),
        "minus_fraction": round(minus, 4),
        "plus_minus_balance": round(plus / (plus + minus), 4) if plus + minus else 0.5,
        "scale_min": float(layers["scale"].min()),
        "scale_median": float(layers["scale"].median()),
        "scale_max": float(layers["scale"].max()),
    }


def dense_equivalent(model: BitMarModel) -> BitMarModel:
    """The same architecture with nn.Linear layers holding ternary * scale (see module docstring)."""
    with torch.random.fork_rng(devices=[]):  # construction draws random weights; keep the caller's RNG
        dense = BitMarModel(dataclasses.replace(model.config, quantized=False))
    state = model.state_dict()
    with torch.no_grad():
        # remove_duplicate=False: a layer reachable under two names has two state-dict keys.
        for name, layer in model.named_modules(remove_duplicate=False):
            if isinstance(layer, BitLinear):
                ternary, scale = ternarize(layer.weight)
                state[f"{name}.weight"] = ternary * scale
    dense.load_state_dict(state, strict=True)
    return dense.eval()


def evaluation_prompts(storage: Storage, split: str = "test", max_tasks: int = 64) -> list[str]:
    """Distinct task texts of `split` from the robot_tasks table, in table order."""
    tasks = storage.read_partition("robot_tasks", "all", columns=["task_text", "task_key", "split"])
    rows = tasks[tasks["split"] == split].drop_duplicates("task_key")
    if rows.empty:
        raise TrainingDataError(f"robot_tasks has no {split!r} rows to evaluate the quantized model on")
    return rows["task_text"].head(max_tasks).tolist()


@torch.no_grad()
def evaluation_batches(
    model: BitMarModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = 16,
    decode_tokens: int = 32,
) -> list[dict[str, torch.Tensor]]:
    """Prompts encoded as at evaluation, with the trained model's own greedy reasoning as the
    decoder input, so logits are compared on the text the model actually writes."""
    batches = []
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(
            [format_prompt(t) for t in prompts[start : start + batch_size]], add_special_tokens=False,
            truncation=True, max_length=model.config.max_seq_len, padding=True, return_tensors="pt",
        )
        generated = model.generate(encoded["input_ids"], encoded["attention_mask"], max_new_tokens=decode_tokens)
        batches.append(
            {
                "input_ids": encoded["input_ids"],
                "attention_mask": encoded["attention_mask"],
                "decoder_input_ids": generated.sequences,
                "decoder_attention_mask": generated.attention_mask,
            }
        )
    return batches


@torch.no_grad()
def output_agreement(
    reference: BitMarModel, candidate: nn.Module, batches: Sequence[dict[str, torch.Tensor]]
) -> dict[str, Any]:
    """How closely `candidate` reproduces `reference` on robot probabilities and decoder logits
    (logits compared at real decoder tokens only)."""
    prob_diff = logit_diff = 0.0
    rows = top1 = same_selection = tokens = token_top1 = 0
    equal = True
    for batch in batches:
        a, b = reference(**batch), candidate(**batch)
        prob_diff = max(prob_diff, float((a.robot_probs - b.robot_probs).abs().max()))
        top1 += int((a.robot_probs.argmax(-1) == b.robot_probs.argmax(-1)).sum())
        same_selection += sum(
            x == y
            for x, y in zip(
                BitMarModel.extract_robot_selections(a), BitMarModel.extract_robot_selections(b), strict=True
            )
        )
        rows += a.robot_probs.shape[0]
        real = batch["decoder_attention_mask"].bool()
        logits_a, logits_b = a.logits[real], b.logits[real]
        logit_diff = max(logit_diff, float((logits_a - logits_b).abs().max()))
        token_top1 += int((logits_a.argmax(-1) == logits_b.argmax(-1)).sum())
        tokens += int(real.sum())
        equal = equal and torch.equal(a.robot_probs, b.robot_probs) and torch.equal(logits_a, logits_b)
    return {
        "tasks": rows,
        "robot_probs_max_abs_diff": prob_diff,
        "robot_top1_agreement": top1 / rows,
        "robot_selection_agreement": same_selection / rows,
        "decoder_tokens": tokens,
        "logits_max_abs_diff": logit_diff,
        "logits_argmax_agreement": token_top1 / tokens,
        "exactly_equal": equal,
    }


@torch.no_grad()
def cpu_latency(
    models: Mapping[str, nn.Module], batch: dict[str, torch.Tensor], runs: int = 7
) -> dict[str, dict[str, float]]:
    """Median and minimum milliseconds of one forward pass per model. Runs are interleaved
    (a, b, c, a, b, c, ...) so background load and frequency scaling hit every model alike."""
    for model in models.values():
        model(**batch)  # warm-up: allocator, kernels
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(runs):
        for name, model in models.items():
            start = time.perf_counter()
            model(**batch)
            seconds[name].append(time.perf_counter() - start)
    return {
        name: {"median_ms": 1000 * statistics.median(s), "min_ms": 1000 * min(s), "runs": runs}
        for name, s in seconds.items()
    }


def integer_summary(model: nn.Module, integer: nn.Module, calls: MatmulCounts) -> dict[str, Any]:
    """Which matmul the integer form ran on this CPU, how often, and its BitLinear weight memory."""
    fp32, int8 = held_weight_bytes(model), held_weight_bytes(integer)
    return {
        "kernel": "torch._int_mm" if CPU_FAST_INT_MM else "float fallback (no AVX512-VNNI: _int_mm is a scalar loop)",
        "matmul_calls": {"kernel": calls.kernel, "fallback": calls.fallback},
        "weight_bytes": {"fake_quant_fp32": fp32, "integer_int8": int8, "ratio": round(int8 / fp32, 4)},
    }


def _stage_info(storage: Storage) -> dict[str, Any]:
    path = model_dir(storage, GRPO) / STAGE_INFO_FILE
    info = json.loads(path.read_text()) if path.is_file() else {}
    return {"stage": GRPO, "step": info.get("step"), "fingerprint": info.get("fingerprint")}


def build_quantization_report(
    storage: Storage, max_tasks: int = 64, decode_tokens: int = 32, latency_runs: int = 7, batch_size: int = 16
) -> QuantizationReport:
    """Analyse the latest grpo_policy model in storage; writes reports/quantization_report.json
    and the weight-distribution figure."""
    model = load_stage_model(storage, GRPO).eval()
    tokenizer = load_pipeline_tokenizer(storage)
    layers = layer_table(model)
    batches = evaluation_batches(
        model, tokenizer, evaluation_prompts(storage, "test", max_tasks), batch_size, decode_tokens
    )
    stored = round_to_stored(model).eval()  # the trained model as the packed file holds it
    packed, dense = pack_model(stored).eval(), dense_equivalent(model)
    forms = {"fake_quant": model, "integer": packed, "dense_fp32": dense}
    latency = cpu_latency(forms, batches[0], latency_runs)
    calls = matmul_counts(packed)  # the latency runs only: agreement runs it afterwards
    for name, entry in latency.items():
        entry["relative_to_fake_quant"] = round(entry["median_ms"] / latency["fake_quant"]["median_ms"], 3)
        entry["meaning"] = LATENCY_MEANING[name]
    sizes = parameter_report(model)

    out_dir = storage.path(REPORTS_DIR)
    figure = weight_distribution_figure(
        {row.layer: (row.zero_fraction, row.plus_fraction, row.minus_fraction) for row in layers.itertuples()},
        out_dir / "quantization" / FIGURE_FILE,
        title="Ternary weight distribution per BitLinear layer",
    )
    report = {
        "model": _stage_info(storage),
        "layers": layers.to_dict(orient="records"),
        "totals": weight_totals(layers),
        "sizes": {
            k: sizes[k] for k in ("total_parameters", "fp32_bytes", "fp16_bytes", "packed_bytes", "compression_vs_fp32")
        }
        | {"components": sizes["components"]},
        "agreement": {
            "split": "test",
            "decoder_tokens_per_task": decode_tokens,
            "packed_vs_fake_quant": output_agreement(stored, packed, batches),
            "packed_reference": "the fake-quant model with the packed file's fp16 embeddings, norms and biases",
            "fp16_storage_vs_fp32": output_agreement(model, stored, batches),
            "dense_fp32_vs_fake_quant": output_agreement(model, dense, batches),
        },
        "integer": integer_summary(model, packed, calls),
        "latency": {
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "batch_size": int(batches[0]["input_ids"].shape[0]),
            "measures": "one forward pass: selection head and teacher-forced decoder logits",
            "models": latency,
        },
        "figure": figure.relative_to(out_dir).as_posix(),  # relative: the report ships in the release
    }
    # Readers (the release, a person) see the previous report or the complete new one.
    path = atomic_write_json(out_dir / REPORT_FILE, report, indent=2, default=float)
    return QuantizationReport(report, layers, path, figure)
