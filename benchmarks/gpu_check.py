"""One-shot GPU check: the CUDA paths that a CPU machine never runs, in one script (prints JSON).

1. The sample profile end to end on `compute.device=cuda` (bf16 autocast where supported),
   every stage, with per-stage seconds and throughput read back from the Dagster instance.
2. kill -9 during `reasoning_sft` and during `grpo_policy`, then a re-run of the same stage:
   it must resume from the checkpoint the killed run left (`resumed_from_step` > 0) and
   finish (this is where CUDA RNG state is saved and restored).
3. The feature-extraction benchmark on CUDA (DINOv2-base architecture, bf16 autocast).
4. A 2-rank DDP pretraining run (torchrun through Dagster Pipes), only when two GPUs exist.

    python benchmarks/gpu_check.py [--skip-features] [--workdir DIR]

Exits 1 with one line on stderr when CUDA is missing; exits 2 when a check failed (the JSON
still says which). Sized for about 8 minutes on one modern GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--set", "training.save_every_n_steps=10", "--set", "wandb.mode=disabled"]
TRAINING_ASSETS = ("multimodal_pretrain", "reasoning_sft", "grpo_policy")
REPORTED = ("seconds", "final_step", "resumed_from_step", "samples_per_second", "tokens_per_second", "final_loss")


EXTRA: list[str] = []  # --device and --set from the command line, given to every run


def bitmar(*args: str) -> list[str]:
    return [sys.executable, "-m", "bitmar_pipeline.cli", "run", *COMMON, *EXTRA, *args]


def environment(workdir: Path) -> dict[str, str]:
    home = workdir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").touch()  # a persistent local instance, so metadata can be read back
    return {**os.environ, "DAGSTER_HOME": str(home), "HF_HUB_OFFLINE": "1"}


def run_cli(workdir: Path, *args: str, timeout: float = 480) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run(
        bitmar(*args), cwd=workdir, env=environment(workdir), capture_output=True, text=True, timeout=timeout
    )
    tail = (done.stdout + done.stderr).strip().splitlines()[-8:]
    return {"rc": done.returncode, "wall_s": round(time.perf_counter() - started, 1), "tail": tail}


def latest_metadata(workdir: Path, asset: str) -> dict[str, Any]:
    """The newest materialization's metadata of `asset`, read from the run's Dagster instance."""
    os.environ["DAGSTER_HOME"] = str(workdir / "dagster_home")
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return {}
    metadata = event.asset_materialization.metadata
    return {k: metadata[k].value for k in REPORTED if k in metadata}


def kill_then_resume(workdir: Path, asset: str, changed: str) -> dict[str, Any]:
    """Re-train `asset` under a new fingerprint (`changed` setting), kill -9 it after its first
    checkpoint, re-run the same command and read whether it resumed."""
    args = ["--select", asset, "--set", changed]
    checkpoints = workdir / ".bitmar" / "checkpoints" / asset
    before = {p.parent for p in checkpoints.glob("*/latest.json")}
    process = subprocess.Popen(
        bitmar(*args), cwd=workdir, env=environment(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if any(p.parent not in before for p in checkpoints.glob("*/latest.json")):
            break
        time.sleep(0.05)
    killed = process.poll() is None
    if killed:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    rerun = run_cli(workdir, *args)
    metadata = latest_metadata(workdir, asset)
    resumed = metadata.get("resumed_from_step")
    ok = killed and rerun["rc"] == 0 and isinstance(resumed, int) and resumed > 0
    return {"ok": ok, "killed_mid_run": killed, "rerun": rerun, **metadata}


def feature_benchmark(images: int) -> dict[str, Any]:
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "feature_extraction.py"),
        "--device",
        "cuda",
        "--images",
        str(images),
        "--batch-size",
        "32",
        "--repeats",
        "2",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return {"ok": False, "rc": done.returncode, "tail": done.stderr.strip().splitlines()[-5:]}
    return {"ok": True, **json.loads(done.stdout[done.stdout.index("{") :])}


def ddp_pretrain(workdir: Path) -> dict[str, Any]:
    result = run_cli(
        workdir,
        "--select",
        "multimodal_pretrain",
        "--set",
        "compute.nproc_per_node=2",
        "--set",
        "training.pretrain.max_steps=60",
    )
    return {"ok": result["rc"] == 0, **result, **latest_metadata(workdir, "multimodal_pretrain")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep the run here (default: a temporary directory)")
    parser.add_argument("--skip-features", action="store_true", help="skip the feature-extraction benchmark")
    parser.add_argument("--feature-images", type=int, default=256)
    parser.add_argument("--device", default="cuda", help="cpu only to dry-run this script's plumbing on small settings")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every run")
    args = parser.parse_args()
    EXTRA.extend(["--set", f"compute.device={args.device}", *[a for kv in args.set for a in ("--set", kv)]])
    if args.device != "cpu" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing was checked", file=sys.stderr
        )
        return 1
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bitmar-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    on_cuda = args.device != "cpu"
    summary: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name() if on_cuda else None, "gpus": torch.cuda.device_count(),
        "bf16": on_cuda and torch.cuda.is_bf16_supported(), "extra_args": EXTRA,
        "torch": torch.__version__, "cuda": torch.version.cuda, "workdir": str(workdir),
    }
    full = run_cli(workdir)
    summary["sample_profile"] = {
        "ok": full["rc"] == 0,
        **full,
        "stages": {a: latest_metadata(workdir, a) for a in TRAINING_ASSETS},
    }
    summary["kill_resume_sft"] = kill_then_resume(workdir, "reasoning_sft", "training.sft.max_steps=120")
    summary["kill_resume_grpo"] = kill_then_resume(workdir, "grpo_policy", "grpo_reasoning.steps=25")
    if not args.skip_features and on_cuda:
        summary["feature_benchmark"] = feature_benchmark(args.feature_images)
    summary["ddp_2_ranks"] = (
        ddp_pretrain(workdir) if torch.cuda.device_count() >= 2 else {"ok": True, "skipped": "one GPU"}
    )
    checks = [v for v in summary.values() if isinstance(v, dict) and "ok" in v]
    summary["all_ok"] = all(v["ok"] for v in checks)
    print(json.dumps(summary, indent=2, default=str))
    return 0 if summary["all_ok"] else 2


if __name__ == "__main__":
    sys.exit(main())
