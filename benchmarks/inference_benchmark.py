"""BitMar inference benchmark: W1.58A8 integer inference beside the other forms; prints one JSON object.

    python benchmarks/inference_benchmark.py [--quick] [--repeats N] [--new-tokens N] [--threads N] [--skip-rss]

Models: the default ~14M model (BitMarConfig.paper()) and the sample-profile model (BitMarConfig()),
with random weights (seed 0): latency depends on the shapes, not on trained values.
Forms of the same weights, in one process, timed interleaved (a, b, c, a, b, c, ...) so load from
other jobs on a shared CPU hits every form alike; ratios come from the minimum over the runs:
    dense_fp32            nn.Linear holding ternary * gamma (quantization.dense_equivalent)
    fake_quant            BitLinear as trained (`bitmar predict --reference`)
    fake_quant_previous   BitLinear's forward before issue 14 (quantize-dequantize, fp32 F.linear),
                          reproduced here; selection and prefill only (its generation used a
                          frozen-weight path that is gone)
    packed_fp32_previous  PackedBitLinear before issue 14 (codes unpacked once into a cached fp32
                          ternary * gamma matrix), reproduced here: the library no longer has it
    integer               PackedBitLinear now (int8 weights, integer matmul): `bitmar predict`
Per batch size (1, 8, 32), text prompts of 64 tokens:
    selection_ms          model(input_ids): encoder, memory, reasoning and selection head
    prefill_ms            model.generate(max_new_tokens=1) with a 32-token decoder prompt: the
                          forward over the prompts that generation starts with
    generation_tokens_per_s  model.generate with the KV cache, --new-tokens after a BOS prompt
Then the peak RSS (ru_maxrss) of fresh `bitmar predict` processes on a release built (by
build_release) from the default model: integer (default) vs --reference.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitmar_model import BitMarConfig, BitMarModel
from bitmar_model.bitlinear import EPS, BitLinear, quantize_activations, ternarize
from bitmar_model.integer import CPU_FAST_INT_MM
from bitmar_model.packing import held_weight_bytes, matmul_counts, pack_model, replace_bitlinears
from bitmar_pipeline.config import PipelineConfig
from bitmar_pipeline.release.folder import VisionSpec, build_release
from bitmar_pipeline.release.quantization import dense_equivalent
from bitmar_pipeline.storage import Storage
from bitmar_pipeline.text.corpus import TOKENIZER_DIR
from bitmar_pipeline.text.tokenizer import train_bpe_tokenizer
from bitmar_pipeline.training.stages import GRPO, model_dir, publish_model

TEXT_LEN, DECODER_PROMPT_LEN = 64, 32


class PreviousBitLinear(BitLinear):
    """BitLinear.forward before issue 14, as it was: x_q @ (ternary * gamma)^T in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(x, (self.in_features,), eps=EPS)
        levels, scale = quantize_activations(x)
        x_q = (x - x.detach()) + (levels / scale).detach()
        ternary, gamma = ternarize(self.weight)
        w_q = (self.weight - self.weight.detach()) + (ternary * gamma).detach()
        return F.linear(x_q, w_q.to(x_q.dtype), None if self.bias is None else self.bias.to(x_q.dtype))

    @classmethod
    def of(cls, layer: BitLinear) -> PreviousBitLinear:
        previous = cls(layer.in_features, layer.out_features, bias=layer.bias is not None)
        previous.load_state_dict(layer.state_dict())
        return previous


class PreviousPackedBitLinear(nn.Module):
    """PackedBitLinear before issue 14: its forward on the cached fp32 matrix ternary * gamma."""

    def __init__(self, layer: BitLinear) -> None:
        super().__init__()
        ternary, gamma = ternarize(layer.weight.detach())
        self.in_features = layer.in_features
        self.register_buffer("weight", ternary * gamma)
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(x, (self.in_features,), eps=EPS)
        levels, scale = quantize_activations(x)
        return F.linear(levels / scale, self.weight, self.bias)


FORMS = {
    "dense_fp32": "nn.Linear with ternary * gamma, no activation quantization (an ordinary fp32 model)",
    "fake_quant": "BitLinear as trained: re-ternarizes fp32 latent weights per call (bitmar predict --reference)",
    "fake_quant_previous": "BitLinear's forward before issue 14 (fp32 quantize-dequantize), reproduced",
    "packed_fp32_previous": "PackedBitLinear before issue 14 (cached fp32 matrix), reproduced: gone from the library",
    "integer": "PackedBitLinear: int8 weights, 8-bit activations, integer matmul (bitmar predict)",
}


def build_forms(config: BitMarConfig) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    model = BitMarModel(config).eval()
    return {
        "dense_fp32": dense_equivalent(model),
        "fake_quant": model,
        "fake_quant_previous": replace_bitlinears(copy.deepcopy(model), PreviousBitLinear.of).eval(),
        "packed_fp32_previous": replace_bitlinears(copy.deepcopy(model), PreviousPackedBitLinear).eval(),
        "integer": pack_model(model).eval(),
    }


def interleaved(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """Seconds per call (min and median) after one warm-up each; the order alternates per round."""
    for call in calls.values():
        call()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(repeats):
        for name in list(calls) if round_ % 2 == 0 else reversed(list(calls)):
            start = time.perf_counter()
            calls[name]()
            seconds[name].append(time.perf_counter() - start)
    return {name: {"min_s": min(s), "median_s": statistics.median(s)} for name, s in seconds.items()}


def milliseconds(timings: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {n: {"min": round(1e3 * t["min_s"], 2), "median": round(1e3 * t["median_s"], 2)} for n, t in timings.items()}


@torch.no_grad()
def bench_batch(forms: dict[str, nn.Module], batch: int, repeats: int, new_tokens: int) -> dict[str, Any]:
    config = forms["fake_quant"].config
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, config.vocab_size, (batch, TEXT_LEN), generator=g)
    prompt = torch.randint(3, config.vocab_size, (batch, DECODER_PROMPT_LEN), generator=g)
    selection = interleaved({n: (lambda m=m: m(ids)) for n, m in forms.items()}, repeats)
    prefill = interleaved(
        {n: (lambda m=m: m.generate(ids, decoder_input_ids=prompt, max_new_tokens=1)) for n, m in forms.items()},
        repeats,
    )
    generating = {n: m for n, m in forms.items() if n != "fake_quant_previous"}
    generation = interleaved(
        {n: (lambda m=m: m.generate(ids, max_new_tokens=new_tokens, stop_at_eos=False)) for n, m in generating.items()},
        max(2, repeats // 2),
    )
    return {
        "selection_ms": milliseconds(selection),
        "prefill_ms": milliseconds(prefill),
        "generation_tokens_per_s": {n: round(batch * new_tokens / t["min_s"], 1) for n, t in generation.items()},
    }


def ratios(batches: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Speed of the integer form relative to the others (> 1: integer faster), from the minimum times."""
    out = {}
    for batch, result in batches.items():
        for measure in ("selection_ms", "prefill_ms"):
            times = result[measure]
            for other in ("dense_fp32", "fake_quant", "fake_quant_previous", "packed_fp32_previous"):
                out[f"batch{batch}.{measure[:-3]}.{other}_over_integer"] = round(
                    times[other]["min"] / times["integer"]["min"], 3
                )
        tokens = result["generation_tokens_per_s"]
        out[f"batch{batch}.generation.integer_over_dense_fp32"] = round(tokens["integer"] / tokens["dense_fp32"], 3)
    return out


def bench_model(config: BitMarConfig, batches: tuple[int, ...], repeats: int, new_tokens: int) -> dict[str, Any]:
    forms = build_forms(config)
    results = {str(b): bench_batch(forms, b, repeats, new_tokens) for b in batches}
    fp32, int8 = held_weight_bytes(forms["fake_quant"]), held_weight_bytes(forms["integer"])
    calls = matmul_counts(forms["integer"])
    return {
        "parameters": sum(p.numel() for p in forms["fake_quant"].parameters()),
        "bitlinear_weight_bytes": {
            "fake_quant_fp32": fp32,
            "packed_fp32_previous": fp32 + fp32 // 16,  # cached fp32 matrix + the 2-bit codes it kept
            "integer_int8": int8,
            "integer_over_fp32": round(int8 / fp32, 4),
        },
        "integer_matmul_calls": {"kernel": calls.kernel, "fallback": calls.fallback},
        "batches": results,
        "integer_speedup": ratios(results),
    }


# ---------------------------------------------------------------- bitmar predict peak RSS


def paper_release(root: Path) -> Path:
    """A release folder of the default model (random weights) built by build_release, as the
    pipeline builds it: a 16384-token BPE trained on random words, no vision files (text only)."""
    storage = Storage(root / ".bitmar")
    storage.ensure_writable()
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10))) for _ in range(60000)]
    texts = [" ".join(words[i : i + 20]) for i in range(0, len(words), 20)]
    tokenizer = train_bpe_tokenizer(texts, 16384, storage.path(TOKENIZER_DIR), min_frequency=1)
    config = BitMarConfig.paper(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    publish_model(BitMarModel(config), model_dir(storage, GRPO), {"stage": GRPO, "step": 0, "fingerprint": "random"})
    storage.path("reports").mkdir()
    for report in ("evaluation_report.json", "quantization_report.json"):
        storage.path("reports", report).write_text("{}")
    vision = VisionSpec(model="facebook/dinov2-base", source="facebook/dinov2-base", revision=None, patch_grid=4)
    return build_release(storage, PipelineConfig(), vision).path


# Runs `bitmar predict` (the CLI entry point), then reports the process's peak RSS: VmHWM of its own
# address space. ru_maxrss from wait4 would not do: Linux carries the forking parent's high-water
# mark (this benchmark, with every model loaded) into the child across exec.
PREDICT_AND_REPORT_PEAK = """
import sys
from bitmar_pipeline.cli import main
code = main(sys.argv[1:]) if sys.argv[1:] else 0  # no arguments: the imports alone
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
sys.stderr.write(f"\\nVmHWM_kB={peak.split()[1]}\\n")
sys.exit(code)
"""


def predict_peak_rss_mb(arguments: list[str]) -> float:
    """Peak resident memory of one fresh `bitmar <arguments>` process, in MB."""
    argv = [sys.executable, "-c", PREDICT_AND_REPORT_PEAK, *arguments]
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bitmar predict failed: {done.stderr}")
    return round(int(done.stderr.rsplit("VmHWM_kB=", 1)[1].split()[0]) / 1024, 1)


def bench_predict_rss(runs: int, new_tokens: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(sys.stderr):  # the Hub mixin prints while loading; stdout is the JSON
            folder = paper_release(Path(tmp))
        predict = ["predict", "Inspect underwater pipelines", "--model", str(folder), "--json"]
        predict += ["--max-new-tokens", str(new_tokens)]
        commands = {"imports_only": [], "integer": predict, "reference": [*predict, "--reference"]}
        rss: dict[str, list[float]] = {form: [] for form in commands}
        for _ in range(runs):
            for form, arguments in commands.items():
                rss[form].append(predict_peak_rss_mb(arguments))
    return {
        "model": "BitMarConfig.paper(), random weights, release built by build_release",
        "max_new_tokens": new_tokens,
        "peak_rss_mb": rss,
        "integer_minus_reference_mb": round(min(rss["integer"]) - min(rss["reference"]), 1),
        "above_imports_mb": {
            form: round(min(rss[form]) - min(rss["imports_only"]), 1) for form in ("integer", "reference")
        },
    }


def acceptance(paper: dict[str, Any], rss: dict[str, Any] | None) -> dict[str, Any]:
    """The issue's bars on the default model, each with the measured value."""
    r, weights = paper["integer_speedup"], paper["bitlinear_weight_bytes"]
    at_least = {  # bar: (measured, minimum)
        "batch8 prefill, dense_fp32 time / integer time >= 1.5": (r.get("batch8.prefill.dense_fp32_over_integer"), 1.5),
        "batch8 prefill, previous fake-quant time / integer time >= 3": (
            r.get("batch8.prefill.fake_quant_previous_over_integer"),
            3.0,
        ),
        "batch1 prefill, dense_fp32 time / integer time >= 1": (r.get("batch1.prefill.dense_fp32_over_integer"), 1.0),
        "batch8 generation, integer tokens/s / dense_fp32 tokens/s >= 1": (
            r.get("batch8.generation.integer_over_dense_fp32"),
            1.0,
        ),
        "BitLinear weight bytes, fp32 / integer >= 4": (round(1 / weights["integer_over_fp32"], 3), 4.0),
    }
    if rss is not None:
        at_least["predict peak RSS, reference - integer (MB) > 0"] = (-rss["integer_minus_reference_mb"], 1e-9)
    return {bar: {"value": v, "met": None if v is None else v >= minimum} for bar, (v, minimum) in at_least.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8, 2 repeats, 8 new tokens, 1 RSS run")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved timed runs per measure (default 4)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row (default 32)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--skip-rss", action="store_true", help="skip the bitmar predict peak-RSS runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches, repeats, new_tokens, rss_runs = (1, 8, 32), args.repeats, args.new_tokens, 2
    if args.quick:
        batches, repeats, new_tokens, rss_runs = (1, 8), 2, 8, 1

    started = time.perf_counter()
    paper = bench_model(BitMarConfig.paper(), batches, repeats, new_tokens)
    sample = bench_model(BitMarConfig(), batches, repeats, new_tokens)
    rss = None if args.skip_rss else bench_predict_rss(rss_runs, new_tokens)
    result = {
        "environment": {
            "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "int_mm_fast_on_cpu": CPU_FAST_INT_MM,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "note": "random weights (seed 0); ms = min and median of interleaved runs; ratios from the minimum",
        },
        "setup": {"text_len": TEXT_LEN, "decoder_prompt_len": DECODER_PROMPT_LEN, "new_tokens": new_tokens},
        "forms": FORMS,
        "paper_14m": paper,
        "sample_profile": sample,
        "predict_rss": rss,
        "acceptance": acceptance(paper, rss),
        "runtime_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
