"""What Dagster's catalog shows: the standard table metadata (row counts, column schema, URI,
table name), data versions from the pipeline's content fingerprints, and staleness computed
by Dagster's own resolver (the one behind the UI's stale markers) after a setting changes,
new data arrives or a code version is bumped."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest

from assets.definitions import ALL_ASSETS, default_resources
from assets.versions import CODE_VERSIONS, training_code_version
from bitmar_model.modeling import MODEL_REVISION
from bitmar_pipeline.resources.settings import BitmarSettings
from tests.factories import TINY

# Runs whole Dagster runs: deselect with -m 'not slow'; .ci/run runs it.
pytestmark = pytest.mark.slow

SMALL = {
    "data.coco.sample_num_images": 6,
    "data.coco.shard_size": 3,
    "data.robot.source": "sample",
    "data.robot.sample_num_tasks": 20,
    "vision.batch_size": 4,
}
DATA = ["coco_raw", "image_caption_pairs", "vision_features", "robot_selection_tasks", "text_tokenizer"]


def _settings(tmp_path: Path, base: dict, **overrides) -> BitmarSettings:
    return BitmarSettings(overrides={"storage.root": str(tmp_path / "store"), **base, **overrides})


def _materialize(instance, settings, selection, partition=None) -> None:
    assert dg.materialize(
        ALL_ASSETS,
        selection=selection,
        instance=instance,
        resources=default_resources(settings),
        partition_key=partition,
    ).success


def _materialize_data(instance, settings) -> list[str]:
    _materialize(instance, settings, ["coco_raw", "robot_selection_tasks"])
    shards = instance.get_dynamic_partitions("coco_shards")
    for shard in shards:
        _materialize(instance, settings, ["image_caption_pairs", "vision_features"], shard)
    _materialize(instance, settings, ["text_tokenizer"])
    return shards


def _latest(instance, key: str, partition: str | None = None) -> dg.AssetMaterialization:
    if partition is None:
        return instance.get_latest_materialization_event(dg.AssetKey(key)).asset_materialization
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition]), limit=1
    ).records
    return records[0].asset_materialization


def _data_version(instance, key: str, partition: str | None = None) -> str:
    return _latest(instance, key, partition).tags["dagster/data_version"]


def _status(instance, assets, key: str, partition: str | None = None) -> tuple[StaleStatus, list[str]]:
    graph = dg.Definitions(assets=assets, resources=default_resources(BitmarSettings())).resolve_asset_graph()
    resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
    causes = resolver.get_stale_root_causes(dg.AssetKey(key), partition)
    return resolver.get_status(dg.AssetKey(key), partition), sorted(
        f"{c.asset_key.to_user_string()}: {c.reason}" for c in causes
    )


def test_table_metadata_data_versions_and_staleness(tmp_path):
    settings = _settings(tmp_path, SMALL)
    store = tmp_path / "store"
    with dg.instance_for_test() as instance:
        shards = _materialize_data(instance, settings)
        assert len(shards) == 2

        # The catalog's Rows column and Columns tab: row counts over the whole table, the
        # partition's own rows, the Parquet columns, where the data is and its DuckDB view.
        # (row_count: the table when the partition was written, so the last shard sees all 30 rows.)
        pairs = _latest(instance, "image_caption_pairs", shards[1]).metadata
        written = store / "tables" / "image_caption_pairs" / f"{shards[1]}.parquet"
        assert pairs["dagster/row_count"].value == 30 and pairs["dagster/partition_row_count"].value == 15
        assert pairs["dagster/uri"].value == written.resolve().as_uri()
        assert pairs["dagster/table_name"].value == "catalog.main.image_caption_pairs"
        columns = [c.name for c in pairs["dagster/column_schema"].value.columns]
        assert columns == pq.read_schema(written).names and "caption" in columns
        preview = pairs["preview"].value
        assert isinstance(preview, dg.TableMetadataValue) and len(preview.records) == 8
        assert [c.name for c in preview.schema.columns] == ["image_id", "caption", "width", "height", "format"]
        features = _latest(instance, "vision_features", shards[1]).metadata
        assert (features["dagster/row_count"].value, features["dagster/partition_row_count"].value) == (6, 3)
        assert {"cls", "patches", "content_hash"} <= {c.name for c in features["dagster/column_schema"].value.columns}
        robots = _latest(instance, "robot_selection_tasks").metadata
        assert robots["dagster/row_count"].value == robots["tasks"].value > 0
        assert robots["dagster/table_name"].value == "catalog.main.robot_tasks"
        assert "robots" in {c.name for c in robots["dagster/column_schema"].value.columns}
        assert isinstance(robots["quarantined_by_reason"].value, dg.TableMetadataValue)
        manifest = _latest(instance, "coco_raw").metadata
        assert manifest["dagster/row_count"].value == manifest["images"].value == 6

        # Code versions are the stage constants, the training ones carrying MODEL_REVISION.
        assert _latest(instance, "text_tokenizer").tags["dagster/code_version"] == CODE_VERSIONS["text_tokenizer"]
        assert training_code_version("reasoning_sft").startswith(f"model{MODEL_REVISION}.")
        for key in DATA:
            assert _status(instance, ALL_ASSETS, key, shards[0] if key in FEATURE_KEYS else None)[0] == (
                StaleStatus.FRESH
            )

        # Re-running with the same settings writes the same content: same version, nothing stale.
        before = {k: _data_version(instance, k) for k in ("robot_selection_tasks", "coco_raw")}
        features_before = _data_version(instance, "vision_features", shards[0])
        _materialize(instance, settings, ["robot_selection_tasks", "coco_raw"])
        _materialize(instance, settings, ["vision_features"], shards[0])
        assert {k: _data_version(instance, k) for k in before} == before
        assert _data_version(instance, "vision_features", shards[0]) == features_before
        assert _status(instance, ALL_ASSETS, "text_tokenizer")[0] == StaleStatus.FRESH

        # A data setting changes the robot tables: the tokenizer that read them is stale.
        _materialize(
            instance, _settings(tmp_path, SMALL, **{"data.robot.sample_num_tasks": 25}), ["robot_selection_tasks"]
        )
        assert _data_version(instance, "robot_selection_tasks") != before["robot_selection_tasks"]
        status, causes = _status(instance, ALL_ASSETS, "text_tokenizer")
        assert status == StaleStatus.STALE
        assert causes == ["robot_selection_tasks: has a new data version"]

        # New captions in one shard: its features and the tokenizer (reading every shard) are stale.
        shorter = _settings(tmp_path, SMALL, **{"data.max_caption_chars": 30})
        _materialize(instance, shorter, ["image_caption_pairs"], shards[0])
        assert _status(instance, ALL_ASSETS, "vision_features", shards[0])[0] == StaleStatus.STALE
        assert _status(instance, ALL_ASSETS, "vision_features", shards[1])[0] == StaleStatus.FRESH

        # A bumped code version marks the asset itself stale, with that cause.
        bumped = [
            a.map_asset_specs(lambda s: s.replace_attributes(code_version="bumped"))
            if a.key.path == ["text_tokenizer"]
            else a
            for a in ALL_ASSETS
        ]
        status, causes = _status(instance, bumped, "text_tokenizer")
        assert status == StaleStatus.STALE and "text_tokenizer: has a new code version" in causes


FEATURE_KEYS = {"image_caption_pairs", "vision_features"}


def test_a_training_setting_change_marks_the_next_stage_stale(tmp_path):
    """The stage fingerprint is the training stages' data version: the same settings keep it
    (reasoning_sft stays fresh), a changed pretraining learning rate changes it (stale)."""
    tiny = TINY
    settings = _settings(tmp_path, tiny)
    with dg.instance_for_test() as instance:
        _materialize_data(instance, settings)
        _materialize(instance, settings, ["multimodal_pretrain", "reasoning_sft"])
        pretrain = _latest(instance, "multimodal_pretrain")
        assert pretrain.tags["dagster/data_version"] == pretrain.metadata["fingerprint"].value
        assert pretrain.tags["dagster/code_version"] == training_code_version("multimodal_pretrain")
        assert _status(instance, ALL_ASSETS, "reasoning_sft")[0] == StaleStatus.FRESH

        _materialize(instance, settings, ["multimodal_pretrain"])  # same inputs: resumes, same version
        assert _status(instance, ALL_ASSETS, "reasoning_sft")[0] == StaleStatus.FRESH

        changed = _settings(tmp_path, tiny, **{"training.pretrain.learning_rate": 5e-4})
        _materialize(instance, changed, ["multimodal_pretrain"])
        assert (
            _latest(instance, "multimodal_pretrain").tags["dagster/data_version"]
            != pretrain.tags["dagster/data_version"]
        )
        status, causes = _status(instance, ALL_ASSETS, "reasoning_sft")
        assert status == StaleStatus.STALE and causes == ["multimodal_pretrain: has a new data version"]
