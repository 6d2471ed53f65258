"""Data stages: COCO manifest, aligned pairs and vision features per shard, robot tasks,
tokenizer. Thin: configuration and resources in, a plain function call, metadata out."""

import time

import dagster as dg
import numpy as np
import pandas as pd

from assets.metadata import quarantine_metadata, table_metadata, table_preview
from assets.operations import (
    GPU_POOL,
    NETWORK_RETRY,
    NEW_SHARDS,
    ROBOT_FILES,
    UPSTREAM_CHANGED,
    fail_without_retry,
)
from assets.partitions import coco_shards
from assets.versions import CODE_VERSIONS, content_version, files_version
from bitmar_pipeline.data.alignment import align_shard
from bitmar_pipeline.data.coco import (
    CAPTIONS_TABLE,
    IMAGES_TABLE,
    MANIFEST_PARTITION,
    CocoManifest,
    build_manifest,
    fetch_coco,
    read_shard_manifest,
    write_manifest,
)
from bitmar_pipeline.data.coco_download import TqdmProgress, VerificationError
from bitmar_pipeline.data.robot_sources import ROBOT_SUBTASKS_TABLE, ROBOT_TASKS_TABLE, load_robot_tables
from bitmar_pipeline.features.extraction import extract_shard_features
from bitmar_pipeline.resources.settings import BitmarSettings, VisionEncoderResource
from bitmar_pipeline.text.corpus import TOKENIZER_DIR, build_tokenizer, tokenizer_corpus

PAIRS_TABLE = "image_caption_pairs"
DATA_GROUP = "data"


class DownloadProgress:
    """Download progress as Dagster log lines (each stage every 10%) and, on the CLI, tqdm bars."""

    def __init__(self, context: dg.AssetExecutionContext, bars: bool) -> None:
        self.context = context
        self.bars = TqdmProgress() if bars else None
        self.next_share: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int | None, unit: str = "B") -> None:
        if self.bars is not None:
            self.bars(stage, done, total, unit)
        if not total:
            return
        share = done / total
        if share >= self.next_share.get(stage, 0.0):
            amount = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if unit == "B" else f"{done}/{total} {unit}s"
            self.context.log.info(f"{stage}: {amount} ({100 * share:.0f}%)")
            self.next_share[stage] = share + 0.1

    def close(self) -> None:
        if self.bars is not None:
            self.bars.close()


@dg.asset(
    group_name=DATA_GROUP,
    code_version=CODE_VERSIONS["coco_raw"],
    kinds={"python", "parquet"},
    description=(
        "COCO-layout captions and images (sample, local or download), described "
        "as fixed-size shards; registers the coco_shards partitions."
    ),
    retry_policy=NETWORK_RETRY,
)
def coco_raw(context: dg.AssetExecutionContext, settings: BitmarSettings) -> dg.MaterializeResult:
    config, storage = settings.config, settings.storage
    started = time.perf_counter()
    progress = DownloadProgress(context, bars=settings.progress_bars)
    # ValueError: bad config, annotation file or archive member; retried errors stay retried.
    with fail_without_retry(VerificationError, ValueError):
        try:
            root = fetch_coco(config, progress=progress)
        finally:
            progress.close()
        manifest: CocoManifest = build_manifest(
            root, config.data.coco.splits, config.data.coco.max_images, config.data.coco.shard_size
        )
    write_manifest(storage, manifest)
    storage.write_quarantine("coco_raw", "all", manifest.quarantine, context.run.run_id)
    storage.refresh_catalog()

    existing = set(context.instance.get_dynamic_partitions(coco_shards.name))
    new_shards = [s for s in manifest.shards if s not in existing]
    if new_shards:
        context.instance.add_dynamic_partitions(coco_shards.name, new_shards)
    stale = sorted(existing - set(manifest.shards))
    if stale:
        context.log.warning(
            f"{len(stale)} registered shards are no longer in the manifest and will not be trained on: {stale[:10]}"
        )
    per_split = manifest.images.groupby("split").size().rename_axis("split").reset_index(name="images")
    manifest_files = [storage.partition_path(t, MANIFEST_PARTITION) for t in (IMAGES_TABLE, CAPTIONS_TABLE)]
    return dg.MaterializeResult(
        data_version=files_version(manifest_files),
        metadata={
            **table_metadata(storage, IMAGES_TABLE, [manifest_files[0]]),
            "source": config.data.coco.source,
            "root": dg.MetadataValue.path(str(root)),
            "images": len(manifest.images),
            "captions": len(manifest.captions),
            "shards": len(manifest.shards),
            "new_shards": dg.MetadataValue.json(new_shards[:50]),
            "stale_shards": dg.MetadataValue.json(stale[:50]),
            "excluded_by_max_images": manifest.excluded_by_max_images,
            "images_per_split": table_preview(per_split),
            "preview": table_preview(manifest.captions[["image_id", "split", "caption"]]),
            "seconds": round(time.perf_counter() - started, 2),
            **quarantine_metadata(manifest.quarantine),
        },
    )


@dg.asset(
    deps=[coco_raw],
    partitions_def=coco_shards,
    group_name=DATA_GROUP,
    automation_condition=NEW_SHARDS,
    code_version=CODE_VERSIONS["image_caption_pairs"],
    kinds={"python", "parquet", "duckdb"},
    check_specs=[
        dg.AssetCheckSpec("pairs_not_empty", asset=PAIRS_TABLE),
        dg.AssetCheckSpec("quarantine_share_below_threshold", asset=PAIRS_TABLE),
    ],
    description=(
        "One shard of validated, normalised, de-duplicated image-caption pairs; "
        "refused rows go to quarantine with a reason."
    ),
)
def image_caption_pairs(context: dg.AssetExecutionContext, settings: BitmarSettings) -> dg.MaterializeResult:
    config, storage = settings.config, settings.storage
    shard = context.partition_key
    started = time.perf_counter()
    images, captions = read_shard_manifest(storage, shard)
    result = align_shard(
        images,
        captions,
        config.resolved_coco_root(),
        shard,
        min_caption_chars=config.data.min_caption_chars,
        max_caption_chars=config.data.max_caption_chars,
        max_image_pixels=config.data.max_image_pixels,
    )
    path = storage.write_partition(PAIRS_TABLE, shard, result.pairs)
    storage.write_quarantine(PAIRS_TABLE, shard, result.quarantine, context.run.run_id)
    storage.refresh_catalog([PAIRS_TABLE, "quarantine"])
    seconds = time.perf_counter() - started

    rows_in = len(captions) + len(images)
    share = len(result.quarantine) / rows_in if rows_in else 0.0
    limit = config.data.max_quarantine_share
    shard_files = [storage.partition_path(PAIRS_TABLE, s) for s in storage.partitions(PAIRS_TABLE)]
    return dg.MaterializeResult(
        data_version=files_version([path]),
        metadata={
            **table_metadata(storage, PAIRS_TABLE, shard_files, written=path),
            "pairs": len(result.pairs),
            "captions_in": len(captions),
            "images_checked": result.images_checked,
            "images_ok": result.images_ok,
            "quarantine_share": round(share, 4),
            "path": dg.MetadataValue.path(str(path)),
            "preview": table_preview(result.pairs[["image_id", "caption", "width", "height", "format"]]),
            "seconds": round(seconds, 2),
            "images_per_second": round(result.images_checked / seconds, 1) if seconds else 0.0,
            **quarantine_metadata(result.quarantine),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="pairs_not_empty", passed=len(result.pairs) > 0, metadata={"pairs": len(result.pairs)}
            ),
            dg.AssetCheckResult(
                check_name="quarantine_share_below_threshold",
                passed=share <= limit,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={"share": round(share, 4), "threshold": limit},
            ),
        ],
    )


@dg.asset(
    deps=[image_caption_pairs],
    partitions_def=coco_shards,
    group_name=DATA_GROUP,
    automation_condition=NEW_SHARDS,
    code_version=CODE_VERSIONS["vision_features"],
    kinds={"pytorch", "parquet"},
    pool=GPU_POOL,
    check_specs=[
        dg.AssetCheckSpec("features_finite", asset="vision_features"),
        dg.AssetCheckSpec("feature_dimensions_match", asset="vision_features"),
    ],
    description=(
        "DINOv2 CLS vector and pooled patch grid (float16) per image of a "
        "shard, content-addressed by image hash and encoder fingerprint."
    ),
)
def vision_features(
    context: dg.AssetExecutionContext, settings: BitmarSettings, vision_encoder: VisionEncoderResource
) -> dg.MaterializeResult:
    config, storage = settings.config, settings.storage
    shard = context.partition_key
    pairs = storage.read_partition(PAIRS_TABLE, shard, columns=["image_id", "split", "file_name", "content_hash"])
    encoder = vision_encoder.get(settings)
    started = time.perf_counter()
    result = extract_shard_features(
        storage,
        encoder,
        pairs,
        config.resolved_coco_root(),
        shard,
        batch_size=config.vision.batch_size,
        workers=config.vision.num_workers,
        max_pixels=config.data.max_image_pixels,
        log=context.log.info,
    )
    storage.refresh_catalog(["vision_features"])
    seconds = time.perf_counter() - started

    table = result.features
    cls = np.asarray(table.column("cls").combine_chunks().values, dtype=np.float32) if table.num_rows else np.zeros(0)
    patches = (
        np.asarray(table.column("patches").combine_chunks().values, dtype=np.float32) if table.num_rows else np.zeros(0)
    )
    finite = bool(np.isfinite(cls).all() and np.isfinite(patches).all())
    dims = set(table.column("feature_dim").to_pylist())
    dims_ok = dims <= {encoder.feature_dim} and set(table.column("num_patches").to_pylist()) <= {
        encoder.num_patch_tokens
    }
    # Features are content-addressed: the same encoder on the same images gives the same data version.
    hashes = sorted(table.column("content_hash").to_pylist()) if "content_hash" in table.column_names else []
    feature_files = sorted(result.path.parent.glob("*.parquet")) if result.path is not None else []
    return dg.MaterializeResult(
        data_version=content_version(encoder.fingerprint, *hashes),
        metadata={
            **table_metadata(storage, "vision_features", feature_files, written=result.path),
            "images": table.num_rows,
            "encoded": result.encoded,
            "reused_from_cache": result.reused,
            "encode_images_per_second": round(result.images_per_second, 2),
            "seconds": round(seconds, 2),
            "encoder_fingerprint": encoder.fingerprint,
            "vision_model": config.vision.model,
            "device": str(encoder.device),
            "feature_dim": encoder.feature_dim,
            "patch_tokens": encoder.num_patch_tokens,
            "path": dg.MetadataValue.path(str(result.path)),
        },
        check_results=[
            dg.AssetCheckResult(check_name="features_finite", passed=finite),
            dg.AssetCheckResult(
                check_name="feature_dimensions_match",
                passed=dims_ok,
                metadata={"expected_dim": encoder.feature_dim, "found_dims": dg.MetadataValue.json(sorted(dims))},
            ),
        ],
    )


@dg.asset(
    deps=[ROBOT_FILES],
    group_name=DATA_GROUP,
    automation_condition=UPSTREAM_CHANGED,
    code_version=CODE_VERSIONS["robot_selection_tasks"],
    kinds={"python", "parquet", "duckdb"},
    check_specs=[
        dg.AssetCheckSpec("robot_tasks_not_empty", asset="robot_selection_tasks"),
        dg.AssetCheckSpec("no_split_leakage", asset="robot_selection_tasks"),
        dg.AssetCheckSpec("quarantine_share_below_threshold", asset="robot_selection_tasks"),
    ],
    description=(
        "Single- and multi-robot selection tasks with canonical robot names "
        "and a leak-free train/val/test split (tables robot_tasks, robot_subtasks)."
    ),
)
def robot_selection_tasks(context: dg.AssetExecutionContext, settings: BitmarSettings) -> dg.MaterializeResult:
    config, storage = settings.config, settings.storage
    result, files = load_robot_tables(config, storage)
    tasks_path = storage.write_partition(ROBOT_TASKS_TABLE, "all", result.tasks)
    subtasks_path = storage.write_partition(ROBOT_SUBTASKS_TABLE, "all", result.subtasks)
    storage.write_quarantine("robot_selection_tasks", "all", result.quarantine, context.run.run_id)
    storage.refresh_catalog([ROBOT_TASKS_TABLE, ROBOT_SUBTASKS_TABLE, "quarantine"])

    splits_per_key = result.tasks.groupby("task_key")["split"].nunique()
    leaked = splits_per_key[splits_per_key > 1]
    rows_in = len(result.tasks) + len(result.quarantine)
    share = len(result.quarantine) / rows_in if rows_in else 0.0
    split_counts = result.tasks.groupby(["source", "split"]).size().unstack(fill_value=0).reset_index()
    label_counts = (
        result.tasks.explode("robots").groupby("robots").size().rename_axis("robot").reset_index(name="tasks")
    )
    return dg.MaterializeResult(
        data_version=files_version([tasks_path, subtasks_path]),
        metadata={
            **table_metadata(storage, ROBOT_TASKS_TABLE, [tasks_path]),
            "tasks": len(result.tasks),
            "subtasks": len(result.subtasks),
            "files": dg.MetadataValue.json(files),
            "input_rows": dg.MetadataValue.json(result.input_rows),
            "tasks_per_split": table_preview(split_counts),
            "tasks_per_robot": table_preview(label_counts),
            "preview": table_preview(result.tasks[["task_text", "robots", "split"]]),
            "path": dg.MetadataValue.path(str(tasks_path)),
            **quarantine_metadata(result.quarantine),
        },
        check_results=[
            dg.AssetCheckResult(check_name="robot_tasks_not_empty", passed=len(result.tasks) > 0),
            dg.AssetCheckResult(
                check_name="no_split_leakage",
                passed=leaked.empty,
                metadata={"leaked_task_keys": dg.MetadataValue.json(leaked.index[:20].tolist())},
            ),
            dg.AssetCheckResult(
                check_name="quarantine_share_below_threshold",
                passed=share <= config.data.max_quarantine_share,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={"share": round(share, 4), "threshold": config.data.max_quarantine_share},
            ),
        ],
    )


@dg.asset(
    deps=[image_caption_pairs, robot_selection_tasks],
    group_name=DATA_GROUP,
    automation_condition=UPSTREAM_CHANGED,
    code_version=CODE_VERSIONS["text_tokenizer"],
    kinds={"python"},
    description=(
        "Byte-level BPE trained on the captions of training images (never "
        "the held-out ones) and training-split robot texts (or a pretrained tokenizer by name/path)."
    ),
)
def text_tokenizer(context: dg.AssetExecutionContext, settings: BitmarSettings) -> dg.MaterializeResult:
    config, storage = settings.config, settings.storage
    started = time.perf_counter()
    corpus = tokenizer_corpus(
        storage, context.instance.get_dynamic_partitions(coco_shards.name), config.training.heldout_fraction
    )
    tokenizer = build_tokenizer(config.tokenizer, corpus.texts, storage.path(TOKENIZER_DIR))
    lengths = pd.Series([len(ids) for ids in tokenizer(corpus.texts[:2000])["input_ids"]])
    example = corpus.texts[0] if corpus.texts else ""
    return dg.MaterializeResult(
        data_version=files_version(p for p in storage.path(TOKENIZER_DIR).iterdir() if p.is_file()),
        metadata={
            "source": config.tokenizer.source,
            "vocab_size": len(tokenizer),
            "training_texts": dg.MetadataValue.json(corpus.counts),
            "mean_tokens_per_text": round(float(lengths.mean()), 2) if len(lengths) else 0.0,
            "p95_tokens_per_text": int(lengths.quantile(0.95)) if len(lengths) else 0,
            "example": dg.MetadataValue.md(f"`{example}` → {tokenizer.tokenize(example)[:40]}"),
            "path": dg.MetadataValue.path(str(storage.path(TOKENIZER_DIR))),
            "seconds": round(time.perf_counter() - started, 2),
        },
    )
