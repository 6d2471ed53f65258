"""The data graph through the Dagster Python API and the CLI, on real COCO images and the real
robot files (skipped without ../shared/data) and on the offline sample profile."""

import json
import shutil
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from assets.definitions import ALL_ASSETS, default_resources
from bitmar_pipeline.cli import main
from bitmar_pipeline.resources.settings import BitmarSettings
from tests.factories import publish_coco


def _local_settings(tmp_path, coco_root, robot_root):
    return BitmarSettings(
        overrides={
            "storage.root": str(tmp_path / "store"),
            "data.coco.source": "local",
            "data.coco.root": str(coco_root),
            "data.coco.shard_size": 30,
            "data.robot.source": "local",
            "data.robot.single_path": str(robot_root / "single_robot_selection.json"),
            "data.robot.multi_path": str(robot_root / "multi_robot_selection_dataset.json"),
            "vision.batch_size": 8,
        }
    )


def _materialized(result, key):
    return [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(key)]


def _meta(event, name):
    return event.step_materialization_data.materialization.metadata[name].value


def test_one_partition_then_backfill_then_rerun_one_stage(tmp_path, coco_mini, robot_data):
    settings = _local_settings(tmp_path, coco_mini, robot_data)
    resources = default_resources(settings)
    with dg.instance_for_test() as instance:
        first = dg.materialize(
            ALL_ASSETS, selection=["coco_raw", "robot_selection_tasks"], instance=instance, resources=resources
        )
        assert first.success
        shards = instance.get_dynamic_partitions("coco_shards")
        assert shards == ["train2017-00000", "train2017-00001", "train2017-00002"]

        partitioned = ["image_caption_pairs", "vision_features"]
        one = dg.materialize(
            ALL_ASSETS, selection=partitioned, instance=instance, resources=resources, partition_key=shards[0]
        )
        assert one.success
        assert _meta(_materialized(one, "vision_features")[0], "encoded") == 30
        for shard in shards[1:]:  # the backfill of the remaining shards
            assert dg.materialize(
                ALL_ASSETS, selection=partitioned, instance=instance, resources=resources, partition_key=shard
            ).success
        status = instance.get_status_by_partition(dg.AssetKey("vision_features"), shards, ALL_ASSETS[2].partitions_def)
        assert all(s == dg.AssetPartitionStatus.MATERIALIZED for s in status.values())

        rerun = dg.materialize(
            ALL_ASSETS, selection=["vision_features"], instance=instance, resources=resources, partition_key=shards[1]
        )
        assert rerun.success
        assert _materialized(rerun, "image_caption_pairs") == []  # upstream read from storage, not recomputed
        event = _materialized(rerun, "vision_features")[0]
        assert _meta(event, "encoded") == 0 and _meta(event, "reused_from_cache") == 30

        tokenizer = dg.materialize(ALL_ASSETS, selection=["text_tokenizer"], instance=instance, resources=resources)
        assert tokenizer.success

    catalog = tmp_path / "store" / "catalog.duckdb"
    with duckdb.connect(str(catalog), read_only=True) as con:
        assert con.execute("select count(distinct image_id) from vision_features").fetchone()[0] == 80
        assert con.execute("select count(*) from vision_features").fetchone()[0] == 80  # every image exactly once
        assert con.execute("select count(*) from image_caption_pairs").fetchone()[0] == 400
        assert con.execute("select count(*) from robot_tasks").fetchone()[0] == 488
        leaks = con.execute(
            "select count(*) from (select task_key from robot_tasks group by task_key having count(distinct split) > 1)"
        ).fetchone()[0]
        assert leaks == 0
        assert con.execute("select reason, count(*) from quarantine group by reason").fetchall() == [("duplicate", 12)]


def test_cli_local_source_with_bad_rows(tmp_path, coco_mini, capsys):
    root = tmp_path / "coco"
    shutil.copytree(coco_mini, root)
    annotations = root / "annotations" / "captions_train2017.json"
    data = json.loads(annotations.read_text())
    victim = data["images"][0]["file_name"]
    (root / "train2017" / victim).write_bytes(b"")  # a zero-byte image among real ones
    data["annotations"].append({"image_id": data["images"][1]["id"], "id": 999999991, "caption": "   "})
    data["annotations"].append({"image_id": 1, "id": 999999992, "caption": "caption of an image that does not exist"})
    annotations.write_text(json.dumps(data))
    config = tmp_path / "local.yaml"
    config.write_text(
        f"storage:\n  root: {tmp_path / 'store'}\ndata:\n  coco:\n    source: "
        f"local\n    root: {root}\n    shard_size: 40\n"
    )
    code = main(
        [
            "run",
            "--config",
            str(config),
            "--select",
            "coco_raw,image_caption_pairs,vision_features,robot_selection_tasks,text_tokenizer",
        ]
    )
    assert code == 0, capsys.readouterr()
    with duckdb.connect(str(tmp_path / "store" / "catalog.duckdb"), read_only=True) as con:
        reasons = dict(con.execute("select reason, count(*) from quarantine group by reason").fetchall())
        # the 12 duplicates are the bundled public robot files' own (exact repeats of earlier rows)
        assert reasons == {
            "empty_file": 1, "image_empty_file": 5, "empty_caption": 1, "unknown_image_id": 1, "duplicate": 12
        }
        assert con.execute("select count(*) from image_caption_pairs").fetchone()[0] == 395
        assert con.execute("select count(*) from vision_features").fetchone()[0] == 79


def test_cli_sample_profile_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(
        [
            "run",
            "--select",
            "group:data",
            "--set",
            "data.coco.sample_num_images=120",
            "--set",
            "data.coco.shard_size=50",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "vision_features[train2017-00002]" in out
    with duckdb.connect(str(tmp_path / ".bitmar" / "catalog.duckdb"), read_only=True) as con:
        assert con.execute("select count(*) from vision_features").fetchone()[0] == 120
        assert con.execute("select count(*) from image_caption_pairs").fetchone()[0] == 600
        # the bundled public robot files: 500 rows, 12 exact duplicates quarantined, nothing else
        assert con.execute("select reason, count(*) from quarantine group by reason").fetchall() == [("duplicate", 12)]
        assert con.execute("select count(distinct task_key) from robot_tasks").fetchone()[0] == 244
    assert (tmp_path / ".bitmar" / "tokenizer" / "tokenizer.json").is_file()


def test_cli_bad_config_exits_2(tmp_path, capsys):
    assert main(["run", "--set", "data.coco.source=ftp"]) == 2
    assert "data.coco.source" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("selection", "problem"),
    [
        ("nosuch_asset", "unknown asset(s) ['nosuch_asset']"),
        ("coco_raw,nosuch", "unknown asset(s) ['nosuch']"),
        ("group:nosuch", "selects no assets"),
        ("group:(", "Invalid selection string"),
    ],
)
def test_cli_bad_select_is_one_line_listing_valid_names(tmp_path, monkeypatch, capsys, selection, problem):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--select", selection]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"bitmar: --select {selection!r}: {problem}")
    assert "valid assets: coco_raw," in lines[0] and "vision_features" in lines[0] and "group:data" in lines[0]


def test_cli_prints_summaries_and_writes_the_full_log(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--select", "coco_raw,robot_selection_tasks", "--set", "data.coco.sample_num_images=40"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("full Dagster log: ") and out[0].endswith("(--verbose prints it here)")
    assert [line.split(":")[0].strip() for line in out[1:3]] == ["coco_raw", "robot_selection_tasks"]
    assert out[3].startswith("done in ") and len(out) == 4
    log = Path(out[0].removeprefix("full Dagster log: ").split(" (")[0])
    assert log.parent == tmp_path / ".bitmar" / "logs"
    text = log.read_text()
    assert " - DEBUG - " in text and "STEP_SUCCESS" in text and "coco_raw" in text


@pytest.mark.parametrize("selection", ["vision_features"])
def test_cli_partitioned_without_shards_fails_clearly(tmp_path, monkeypatch, capsys, selection):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--select", selection]) == 1
    assert "coco_raw first" in capsys.readouterr().err


def test_coco_raw_download_source_from_a_local_server(tmp_path, monkeypatch, server):
    """`data.coco.source: download` end to end, with the official layout served on loopback."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    publish_coco(server)
    settings = BitmarSettings(
        overrides={
            "storage.root": str(tmp_path / "store"),
            "data.coco.source": "download",
            "data.coco.max_images": 4,
            "data.coco.shard_size": 2,
            "data.coco.annotations_url": f"{server.base}/annotations/annotations_trainval2017.zip",
        }
    )
    resources = default_resources(settings)
    with dg.instance_for_test() as instance:
        assert dg.materialize(ALL_ASSETS, selection=["coco_raw"], instance=instance, resources=resources).success
        shards = instance.get_dynamic_partitions("coco_shards")
        assert shards == ["train2017-00000", "train2017-00001"]
        for shard in shards:
            result = dg.materialize(
                ALL_ASSETS,
                selection=["image_caption_pairs", "vision_features"],
                instance=instance,
                resources=resources,
                partition_key=shard,
            )
            assert result.success
    store = tmp_path / "store"
    with duckdb.connect(str(store / "catalog.duckdb"), read_only=True) as con:
        assert con.execute("select count(*) from vision_features").fetchone()[0] == 4
        assert con.execute("select count(*) from image_caption_pairs").fetchone()[0] == 8
    assert sorted(p.name for p in (store / "raw" / "coco-download" / "train2017").iterdir()) == [
        f"{i:012d}.jpg" for i in (3, 7, 19, 25)
    ]


def test_code_location_loads_without_warnings():
    import warnings

    from assets.definitions import defs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dg.Definitions.validate_loadable(defs)
        graph = defs.resolve_asset_graph()
    # dagster's own conversion of the observable source asset reads a property it deprecated itself.
    internal = "/dagster/_core/definitions/external_asset.py"
    ours = [
        w
        for w in caught
        if "dagster_shared" not in w.filename
        and "pydantic" not in str(w.category.__name__).lower()
        and not w.filename.endswith(internal)
    ]
    assert ours == [], [str(w.message) for w in ours]
    keys = {k.to_user_string() for k in graph.materializable_asset_keys}
    assert keys >= {"coco_raw", "image_caption_pairs", "vision_features", "robot_selection_tasks", "text_tokenizer"}
