"""BitMar model benchmark: prints one JSON object.

    python benchmarks/model_benchmark.py [--quick] [--threads N]

(a) training step (forward + backward + AdamW step) of the default model with BitLinear
    vs the same architecture with nn.Linear (config.quantized=False), same weights and
    batch, timings interleaved so machine noise hits both alike; reports the overhead ratio;
(b) bytes per component: fp32 vs fp16 vs packed ternary;
(c) greedy generation throughput with the KV cache vs recomputing the sequence each step
    (batch 1 = latency; batch 8 = a GRPO sampling group).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from bitmar_model import BitMarConfig, BitMarModel, parameter_report


def make_batch(cfg: BitMarConfig, batch: int, text_len: int, dec_len: int) -> dict:
    g = torch.Generator().manual_seed(0)
    dec = torch.randint(3, cfg.vocab_size, (batch, dec_len), generator=g)
    return {
        "input_ids": torch.randint(3, cfg.vocab_size, (batch, text_len), generator=g),
        "vision_features": {
            "cls": torch.randn(batch, cfg.vision_feature_dim, generator=g),
            "patches": torch.randn(batch, cfg.vision_num_patches, cfg.vision_feature_dim, generator=g),
        },
        "decoder_input_ids": dec,
        "labels": dec,
    }


def training_step(model: BitMarModel, optimizer: torch.optim.Optimizer, batch: dict) -> Callable[[], float]:
    def step() -> float:
        start = time.perf_counter()
        out = model(**batch)
        targets = torch.zeros_like(out.robot_logits)
        logits = out.logit_scale * out.image_embeds @ out.text_embeds.t()
        labels = torch.arange(logits.shape[0])
        loss = (
            out.loss
            + torch.nn.functional.binary_cross_entropy_with_logits(out.robot_logits, targets)
            + torch.nn.functional.cross_entropy(logits, labels)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def bench_training(steps: int, batch_size: int, text_len: int, dec_len: int) -> dict:
    models = {}
    for quantized in (True, False):
        torch.manual_seed(0)
        models[quantized] = BitMarModel(BitMarConfig.paper(quantized=quantized)).train()
    batch = make_batch(models[True].config, batch_size, text_len, dec_len)
    steppers = {q: training_step(m, torch.optim.AdamW(m.parameters(), lr=1e-4), batch) for q, m in models.items()}
    for stepper in steppers.values():  # warm-up: allocator, kernels, optimizer state
        stepper()
        stepper()
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(steps):
        order = (True, False) if i % 2 == 0 else (False, True)
        for quantized in order:
            times[quantized].append(steppers[quantized]())
    bit, fp = statistics.median(times[True]), statistics.median(times[False])
    return {
        "batch": {"batch_size": batch_size, "text_len": text_len, "decoder_len": dec_len},
        "steps": steps,
        "bitlinear_step_s": round(bit, 4),
        "nn_linear_step_s": round(fp, 4),
        "overhead_ratio": round(bit / fp, 3),
        "target_ratio": 1.3,
    }


def bench_sizes() -> dict:
    report = parameter_report(BitMarModel(BitMarConfig.paper()))
    return {
        "total_parameters": report["total_parameters"],
        "fp32_bytes": report["fp32_bytes"],
        "fp16_bytes": report["fp16_bytes"],
        "packed_bytes": report["packed_bytes"],
        "compression_vs_fp32": round(report["compression_vs_fp32"], 2),
        "components": {
            name: {k: c[k] for k in ("parameters", "fp32_bytes", "packed_bytes")}
            for name, c in report["components"].items()
            if c["parameters"]
        },
    }


def bench_generation(new_tokens: int, prompt_len: int, batch_sizes: tuple[int, ...], repeats: int) -> dict:
    """Greedy decoding of `new_tokens` after a `prompt_len`-token decoder prompt (a task
    prompt, as in reasoning generation), cached vs recomputed; eos stopping off so every
    run produces exactly `new_tokens` tokens per row."""
    torch.manual_seed(0)
    model = BitMarModel(BitMarConfig.paper()).eval()
    runs = []
    for batch_size in batch_sizes:
        batch = make_batch(model.config, batch_size, 32, prompt_len)
        args = (batch["input_ids"], None, batch["vision_features"])
        kwargs = dict(decoder_input_ids=batch["decoder_input_ids"], max_new_tokens=new_tokens, stop_at_eos=False)
        best = {True: float("inf"), False: float("inf")}
        for _ in range(repeats):  # interleaved, best of `repeats`
            for use_cache in (True, False):
                start = time.perf_counter()
                out = model.generate(*args, use_cache=use_cache, **kwargs)
                best[use_cache] = min(best[use_cache], time.perf_counter() - start)
                assert out.new_tokens.shape == (batch_size, new_tokens)
        tokens = batch_size * new_tokens
        runs.append(
            {
                "batch_size": batch_size,
                "cached_tokens_per_s": round(tokens / best[True], 1),
                "uncached_tokens_per_s": round(tokens / best[False], 1),
                "speedup": round(best[False] / best[True], 2),
            }
        )
    return {"new_tokens": new_tokens, "prompt_len": prompt_len, "runs": runs, "target_speedup": 3.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short smoke run (few steps, short generation)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.quick:
        training = bench_training(steps=2, batch_size=2, text_len=16, dec_len=16)
        generation = bench_generation(new_tokens=32, prompt_len=8, batch_sizes=(1,), repeats=1)
    else:
        training = bench_training(steps=10, batch_size=8, text_len=32, dec_len=64)
        generation = bench_generation(new_tokens=256, prompt_len=32, batch_sizes=(1, 8), repeats=2)
    print(
        json.dumps(
            {
                "environment": {
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "machine": platform.machine(),
                    "quick": args.quick,
                },
                "training_step": training,
                "sizes": bench_sizes(),
                "generation": generation,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
