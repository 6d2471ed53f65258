"""coco_raw: bring a COCO-layout dataset into place and describe it as shards.

The manifest (tables `coco_images` and `coco_captions`) is what the partitioned stages read:
each image gets a shard key `<split>-<NNNNN>` (a fixed number of images per shard, images
sorted by id), so shard contents are stable across re-runs and new images only add shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bitmar_pipeline.config import ConfigError, PipelineConfig
from bitmar_pipeline.data.coco_download import StageProgress, download_coco
from bitmar_pipeline.data.coco_layout import discover_caption_files, read_caption_annotations
from bitmar_pipeline.data.coco_sample import generate_sample_coco
from bitmar_pipeline.storage import Storage

IMAGES_TABLE = "coco_images"
CAPTIONS_TABLE = "coco_captions"
MANIFEST_PARTITION = "all"


@dataclass
class CocoManifest:
    root: Path
    images: pd.DataFrame  # image_id, split, file_name, width, height, shard
    captions: pd.DataFrame  # caption_id, image_id, split, caption
    quarantine: pd.DataFrame  # source, key, reason, detail
    excluded_by_max_images: int

    @property
    def shards(self) -> list[str]:
        return sorted(self.images["shard"].unique())


def shard_key(split: str, index: int) -> str:
    return f"{split}-{index:05d}"


def fetch_coco(config: PipelineConfig, progress: StageProgress | None = None) -> Path:
    """Make the configured COCO-layout directory exist and return its root."""
    coco = config.data.coco
    root = config.resolved_coco_root()
    if coco.source == "sample":
        return generate_sample_coco(
            root, num_images=coco.sample_num_images, seed=coco.sample_seed, image_size=coco.sample_image_size
        )
    if coco.source == "download":
        return download_coco(
            root,
            split=coco.download_split,
            max_images=coco.max_images,
            annotations_url=coco.annotations_url,
            image_base_url=coco.images_base_url,
            progress=progress,
            workers=coco.download_workers,
        )
    if not root.is_dir():
        raise ConfigError(f"data.coco.root: {root} is not a directory (data.coco.source is 'local')")
    return root


def build_manifest(root: Path, splits: list[str] | None, max_images: int | None, shard_size: int) -> CocoManifest:
    """Read every captions_<split>.json under `root` into the image/caption manifest."""
    files = discover_caption_files(root)
    if splits is not None:
        unknown = sorted(set(splits) - set(files))
        if unknown:
            raise ConfigError(
                f"data.coco.splits: {unknown} not found under {root}/annotations (found: {sorted(files)})"
            )
        files = {split: files[split] for split in splits}
    images, captions, problems = [], [], []
    for split, path in sorted(files.items()):
        annotations = read_caption_annotations(path)
        images.append(annotations.images.assign(split=split))
        captions.append(annotations.captions.assign(split=split))
        problems.append(
            pd.DataFrame(annotations.problems, columns=["key", "reason", "detail"]).assign(source=str(path))
        )
    images_df = pd.concat(images, ignore_index=True).sort_values(["split", "image_id"], kind="stable")
    captions_df = pd.concat(captions, ignore_index=True)
    quarantine = pd.concat(problems, ignore_index=True)

    excluded = 0
    if max_images is not None and len(images_df) > max_images:
        excluded = len(images_df) - max_images
        images_df = images_df.head(max_images)
    # Unknown image ids were already reported by read_caption_annotations; what remains here
    # are captions of images left out by max_images, which is a choice, not bad data.
    known = set(zip(images_df["split"], images_df["image_id"], strict=True))
    pair_keys = list(zip(captions_df["split"], captions_df["image_id"], strict=True))
    captions_df = captions_df[[k in known for k in pair_keys]].reset_index(drop=True)

    images_df = images_df.reset_index(drop=True)
    position = images_df.groupby("split").cumcount()
    images_df["shard"] = [
        shard_key(split, pos // shard_size) for split, pos in zip(images_df["split"], position, strict=True)
    ]
    return CocoManifest(root, images_df, captions_df, quarantine[["source", "key", "reason", "detail"]], excluded)


def write_manifest(storage: Storage, manifest: CocoManifest) -> None:
    storage.write_partition(IMAGES_TABLE, MANIFEST_PARTITION, manifest.images)
    storage.write_partition(CAPTIONS_TABLE, MANIFEST_PARTITION, manifest.captions)


def read_shard_manifest(storage: Storage, shard: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The images of one shard and their captions, from the stored manifest."""
    images = storage.read_partition(IMAGES_TABLE, MANIFEST_PARTITION)
    images = images[images["shard"] == shard].reset_index(drop=True)
    if images.empty:
        raise ValueError(f"shard {shard!r} is not in the coco_images manifest; re-materialize coco_raw")
    captions = storage.read_partition(CAPTIONS_TABLE, MANIFEST_PARTITION)
    captions = captions[
        captions["image_id"].isin(images["image_id"]) & captions["split"].isin(images["split"].unique())
    ]
    return images, captions.reset_index(drop=True)


def manifest_shards(storage: Storage) -> list[str]:
    """The shards of the current manifest (registered partitions may include stale ones)."""
    images = storage.read_partition(IMAGES_TABLE, MANIFEST_PARTITION, columns=["shard"])
    return sorted(images["shard"].unique())
