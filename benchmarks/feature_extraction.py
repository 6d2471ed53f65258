"""Feature extraction benchmark (prints JSON).

1. Throughput of the asset's code path (`extract_shard_features`: read, decode, preprocess
   overlapped with inference, pool, write Parquet) versus the raw model forward pass on
   pre-decoded tensors: same model, batch size and machine, measured in one run.
2. Re-materializing an already-cached shard versus the cold run.

DINOv2-base architecture with random weights by default (timing does not depend on the
weights); images are the real COCO sample in ../shared/data/coco-mini, cycled to --images.

    python benchmarks/feature_extraction.py [--images 64] [--batch-size 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

from bitmar_pipeline.data.images import open_rgb
from bitmar_pipeline.features.extraction import extract_shard_features
from bitmar_pipeline.features.vision_encoder import VisionEncoder
from bitmar_pipeline.storage import Storage

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"


def build_base_architecture(directory: Path) -> Path:
    torch.manual_seed(0)
    Dinov2Model(
        Dinov2Config(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            image_size=518,
            patch_size=14,
        )
    ).save_pretrained(directory)
    # facebook/dinov2-base's preprocessing: shortest edge 256, centre crop 224, ImageNet stats.
    BitImageProcessorPil(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        resample=3,
    ).save_pretrained(directory)
    return directory


def make_dataset(source: Path, target: Path, count: int) -> pd.DataFrame:
    """`count` distinct images (the sample cycled with a one-byte JPEG comment change), so the
    cache cannot serve one image for another."""
    files = sorted((source / "train2017").glob("*.jpg"))
    (target / "train2017").mkdir(parents=True)
    rows = []
    for i in range(count):
        data = files[i % len(files)].read_bytes()
        data = data[:2] + b"\xff\xfe\x00\x06" + i.to_bytes(4, "big") + data[2:]  # JPEG COM segment
        name = f"{i:06d}.jpg"
        (target / "train2017" / name).write_bytes(data)
        rows.append(
            {"image_id": i, "split": "train2017", "file_name": name, "content_hash": hashlib.sha256(data).hexdigest()}
        )
    return pd.DataFrame(rows)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--model", default=None, help="model dir or hub id (default: DINOv2-base architecture, random weights)"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    work = Path(tempfile.mkdtemp(prefix="bitmar-bench-"))
    try:
        model_dir = args.model or str(build_base_architecture(work / "model"))
        images = make_dataset(args.data, work / "coco", args.images)
        encoder = VisionEncoder(
            args.model or "dinov2-base-architecture", model_dir, None, patch_grid=4, device=args.device
        )
        paths = [work / "coco" / "train2017" / f for f in images["file_name"]]
        predecoded = torch.stack([encoder.preprocessing(open_rgb(p.read_bytes(), 10**8)) for p in paths])
        encoder.encode(predecoded[: args.batch_size])  # warm-up (allocator, kernels)

        def sync() -> None:
            if encoder.device.type == "cuda":
                torch.cuda.synchronize()

        raw_times, pipeline_times = [], []
        for repeat in range(args.repeats):
            # Interleaved, so machine noise hits both sides alike.
            sync()
            started = time.perf_counter()
            for start in range(0, len(predecoded), args.batch_size):
                encoder.encode(predecoded[start : start + args.batch_size])
            sync()
            raw_times.append(time.perf_counter() - started)

            storage = Storage(work / f"store-{repeat}")
            started = time.perf_counter()
            extract_shard_features(
                storage, encoder, images, work / "coco", "bench", batch_size=args.batch_size, workers=args.workers
            )
            sync()
            pipeline_times.append(time.perf_counter() - started)

        cached_times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            result = extract_shard_features(
                storage, encoder, images, work / "coco", "bench", batch_size=args.batch_size, workers=args.workers
            )
            cached_times.append(time.perf_counter() - started)
            assert result.encoded == 0

        raw = statistics.median(raw_times)
        pipeline = statistics.median(pipeline_times)
        cached = statistics.median(cached_times)
        print(
            json.dumps(
                {
                    "machine": {
                        "platform": platform.platform(),
                        "cpus": torch.get_num_threads(),
                        "device": str(encoder.device),
                        "gpu": torch.cuda.get_device_name() if encoder.device.type == "cuda" else None,
                    },
                    "model": args.model or "dinov2-base architecture (random weights)",
                    "images": args.images,
                    "batch_size": args.batch_size,
                    "autocast": str(encoder.autocast_dtype),
                    "raw_forward_images_per_s": round(args.images / raw, 2),
                    "asset_path_images_per_s": round(args.images / pipeline, 2),
                    "asset_vs_raw_ratio": round(raw / pipeline, 3),
                    "cold_run_s": round(pipeline, 3),
                    "cached_rerun_s": round(cached, 4),
                    "cached_speedup": round(pipeline / cached, 1),
                    "raw_times_s": [round(t, 3) for t in raw_times],
                    "asset_times_s": [round(t, 3) for t in pipeline_times],
                },
                indent=2,
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
