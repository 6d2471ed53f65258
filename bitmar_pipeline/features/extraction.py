"""Vision feature extraction for one shard, content-addressed and overlapped with decoding.

Features are keyed by (sha256 of the image bytes, encoder fingerprint). Before encoding a
shard, every feature already stored under the same fingerprint is looked up by hash, so an
unchanged image with an unchanged encoder is never encoded twice, whichever shard it was
first seen in. Decoding and preprocessing of the next batches run in a thread pool while
the model works on the current one (PIL releases the GIL while decoding).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import torch

from bitmar_pipeline.data.images import open_rgb, resolve_inside
from bitmar_pipeline.features.vision_encoder import VisionEncoder
from bitmar_pipeline.storage import TMP_PREFIX, Storage

FEATURES_TABLE = "vision_features"


@dataclass
class FeatureResult:
    features: pa.Table
    encoded: int
    reused: int
    seconds_encoding: float
    path: Path | None = None

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds_encoding if self.seconds_encoding > 0 else 0.0


def feature_dir(storage: Storage, fingerprint: str) -> Path:
    return storage.table_dir(FEATURES_TABLE) / fingerprint


def feature_path(storage: Storage, fingerprint: str, shard: str) -> Path:
    return feature_dir(storage, fingerprint) / f"{shard}.parquet"


def lookup_cached(storage: Storage, fingerprint: str, hashes: set[str]) -> pa.Table | None:
    """Stored features (any shard) of this encoder for the given content hashes, one row per hash."""
    directory = feature_dir(storage, fingerprint)
    files = (
        [str(p) for p in directory.glob("*.parquet") if not p.name.startswith(TMP_PREFIX)] if directory.is_dir() else []
    )
    if not files or not hashes:
        return None
    table = ds.dataset(files, format="parquet").to_table(
        columns=["content_hash", "cls", "patches"], filter=ds.field("content_hash").isin(sorted(hashes))
    )
    if table.num_rows == 0:
        return None
    # The same image may sit in several shards; keep one row per hash.
    _, first = np.unique(table.column("content_hash").to_numpy(zero_copy_only=False), return_index=True)
    return table.take(pa.array(np.sort(first)))


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def iter_encoded(
    encoder: VisionEncoder,
    paths: list[Path],
    batch_size: int,
    workers: int,
    max_pixels: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Encode images batch by batch; decoding of later batches overlaps with inference."""

    def load(path: Path) -> torch.Tensor:
        return encoder.preprocessing(open_rgb(path.read_bytes(), max_pixels))

    def load_batch(batch: list[Path]) -> torch.Tensor:
        return torch.stack([load(p) for p in batch])

    batches = list(_batches(paths, batch_size))
    if workers == 0:
        for batch in batches:
            yield encoder.encode(load_batch(batch))
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # Keep `workers + 1` batches in flight: enough to hide decoding, bounded in memory.
        pending = [pool.submit(load_batch, b) for b in batches[: workers + 1]]
        next_index = len(pending)
        while pending:
            pixels = pending.pop(0).result()
            if next_index < len(batches):
                pending.append(pool.submit(load_batch, batches[next_index]))
                next_index += 1
            yield encoder.encode(pixels)


def _feature_table(
    image_ids: list[int], hashes: list[str], cls: np.ndarray, patches: np.ndarray, fingerprint: str, shard: str
) -> pa.Table:
    n, dim = cls.shape
    cls_values = pa.array(cls.astype(np.float16).reshape(-1), type=pa.float16())
    patch_values = pa.array(patches.astype(np.float16).reshape(-1), type=pa.float16())
    patch_width = patches.shape[1] * patches.shape[2] if patches.ndim == 3 else 0
    return pa.table(
        {
            "image_id": pa.array(image_ids, type=pa.int64()),
            "content_hash": pa.array(hashes, type=pa.string()),
            "encoder_fingerprint": pa.array([fingerprint] * n, type=pa.string()),
            "shard": pa.array([shard] * n, type=pa.string()),
            "feature_dim": pa.array([dim] * n, type=pa.int32()),
            "num_patches": pa.array([patches.shape[1] if patches.ndim == 3 else 0] * n, type=pa.int32()),
            "cls": pa.FixedSizeListArray.from_arrays(cls_values, dim).cast(pa.list_(pa.float16())),
            "patches": pa.FixedSizeListArray.from_arrays(patch_values, patch_width).cast(pa.list_(pa.float16()))
            if patch_width
            else pa.array([[]] * n, type=pa.list_(pa.float16())),
        }
    )


def extract_shard_features(
    storage: Storage,
    encoder: VisionEncoder,
    images: pd.DataFrame,
    dataset_root: Path,
    shard: str,
    batch_size: int = 32,
    workers: int = 1,
    max_pixels: int = 40_000_000,
    log: Callable[[str], None] = lambda message: None,
) -> FeatureResult:
    """Features of one shard's distinct images (image_id, split, file_name, content_hash).

    Writes `vision_features/<fingerprint>/<shard>.parquet` atomically and returns the table.
    """
    images = images.drop_duplicates("image_id").sort_values("image_id").reset_index(drop=True)
    cached = lookup_cached(storage, encoder.fingerprint, set(images["content_hash"]))
    cached_by_hash = {} if cached is None else {h: i for i, h in enumerate(cached.column("content_hash").to_pylist())}
    missing = images[~images["content_hash"].isin(cached_by_hash)]
    missing_unique = missing.drop_duplicates("content_hash")
    log(f"shard {shard}: {len(images)} images, {len(images) - len(missing)} cached, encoding {len(missing_unique)}")

    encoded_cls: dict[str, np.ndarray] = {}
    encoded_patches: dict[str, np.ndarray] = {}
    paths = []
    for row in missing_unique.itertuples(index=False):
        path = resolve_inside(dataset_root, f"{row.split}/{row.file_name}")
        if path is None:
            raise ValueError(f"image {row.image_id}: {row.split}/{row.file_name} escapes dataset root {dataset_root}")
        paths.append(path)
    hashes = missing_unique["content_hash"].tolist()
    started = time.perf_counter()
    done = 0
    for cls, patches in iter_encoded(encoder, paths, batch_size, workers, max_pixels):
        for offset in range(cls.shape[0]):
            encoded_cls[hashes[done + offset]] = cls[offset].numpy()
            encoded_patches[hashes[done + offset]] = patches[offset].numpy()
        done += cls.shape[0]
        if done == len(paths) or done % (batch_size * 10) == 0:
            log(f"shard {shard}: encoded {done}/{len(paths)} images")
    seconds = time.perf_counter() - started

    cls_rows, patch_rows = [], []
    cached_cls = cached.column("cls") if cached is not None else None
    cached_patches = cached.column("patches") if cached is not None else None
    for content_hash in images["content_hash"]:
        if content_hash in encoded_cls:
            cls_rows.append(encoded_cls[content_hash])
            patch_rows.append(encoded_patches[content_hash])
        else:
            index = cached_by_hash[content_hash]
            cls_rows.append(np.asarray(cached_cls[index].values, dtype=np.float32))
            patch_rows.append(
                np.asarray(cached_patches[index].values, dtype=np.float32).reshape(encoder.num_patch_tokens, -1)
                if encoder.num_patch_tokens
                else np.zeros((0, encoder.feature_dim), np.float32)
            )
    table = _feature_table(
        images["image_id"].tolist(),
        images["content_hash"].tolist(),
        np.stack(cls_rows) if cls_rows else np.zeros((0, encoder.feature_dim), np.float32),
        np.stack(patch_rows)
        if patch_rows
        else np.zeros((0, encoder.num_patch_tokens, encoder.feature_dim), np.float32),
        encoder.fingerprint,
        shard,
    )
    path = storage.write_partition(f"{FEATURES_TABLE}/{encoder.fingerprint}", shard, table)
    return FeatureResult(
        table, encoded=len(paths), reused=len(images) - len(missing), seconds_encoding=seconds, path=path
    )


def load_features(
    storage: Storage, fingerprint: str, shards: list[str] | None = None
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """(index frame [image_id, content_hash, shard], CLS [N, F] float32, patches [N, P, F] float32)."""
    directory = feature_dir(storage, fingerprint)
    names = (
        shards
        if shards is not None
        else sorted(p.stem for p in directory.glob("*.parquet") if not p.name.startswith(TMP_PREFIX))
    )
    if not names:
        raise FileNotFoundError(
            f"no vision features for encoder {fingerprint} under {directory}; materialize vision_features first"
        )
    table = ds.dataset([str(directory / f"{n}.parquet") for n in names], format="parquet").to_table()
    n = table.num_rows
    dim = int(table.column("feature_dim")[0].as_py()) if n else 0
    num_patches = int(table.column("num_patches")[0].as_py()) if n else 0
    cls = table.column("cls").combine_chunks().values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, dim)
    patches = (
        table.column("patches")
        .combine_chunks()
        .values.to_numpy(zero_copy_only=False)
        .astype(np.float32)
        .reshape(n, num_patches, dim)
    )
    index = table.select(["image_id", "content_hash", "shard"]).to_pandas()
    return index, cls, patches
