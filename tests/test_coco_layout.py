from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitmar_pipeline.data.coco_layout import (
    AnnotationFileError,
    caption_file,
    discover_caption_files,
    image_dir,
    read_caption_annotations,
    write_json_atomic,
)


def _write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_real_coco_mini_reads_cleanly(coco_mini: Path) -> None:
    files = discover_caption_files(coco_mini)
    assert list(files) == ["train2017"]
    ann = read_caption_annotations(files["train2017"])
    assert len(ann.images) == 80
    assert len(ann.captions) == 400
    assert ann.problems.empty
    assert ann.images["image_id"].is_unique and ann.captions["caption_id"].is_unique
    assert set(ann.captions["image_id"]) <= set(ann.images["image_id"])
    assert (ann.images["width"] > 0).all() and (ann.images["height"] > 0).all()
    for name in ann.images["file_name"]:
        assert (image_dir(coco_mini, "train2017") / name).is_file()


def test_discover_any_split_names(tmp_path: Path) -> None:
    for split in ("val2017", "mysplit"):
        _write(caption_file(tmp_path, split), {"images": [], "annotations": []})
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    (tmp_path / "annotations" / ".captions_x.json.123.tmp").write_text("{")
    assert discover_caption_files(tmp_path) == {
        "mysplit": tmp_path / "annotations" / "captions_mysplit.json",
        "val2017": tmp_path / "annotations" / "captions_val2017.json",
    }


def test_discover_none_names_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        discover_caption_files(tmp_path)


def test_truncated_json_names_file_and_position(tmp_path: Path) -> None:
    path = tmp_path / "captions_x.json"
    path.write_text(
        '{"images": [\n  {"id": 1, "file_name": "a.jpg"},\n  {"id": 2, "fi', encoding="utf-8"
    )
    with pytest.raises(
        AnnotationFileError, match=r"captions_x\.json.*line 3 column \d+ \(char \d+\)"
    ):
        read_caption_annotations(path)


def test_not_utf8_names_file(tmp_path: Path) -> None:
    path = tmp_path / "captions_x.json"
    path.write_bytes(b'{"images": "\xff\xfe\xfa"}')
    with pytest.raises(AnnotationFileError, match="captions_x.json"):
        read_caption_annotations(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "top level is list"),
        ({"annotations": []}, "missing top-level key 'images'"),
        ({"images": [], "annotations": {}}, "'annotations' is dict, expected a list"),
    ],
)
def test_wrong_structure_names_file_and_key(tmp_path: Path, data: object, message: str) -> None:
    path = _write(tmp_path / "captions_x.json", data)
    with pytest.raises(AnnotationFileError, match=message) as info:
        read_caption_annotations(path)
    assert str(path) in str(info.value)


def test_bad_rows_are_reported_not_dropped(tmp_path: Path) -> None:
    data = {
        "images": [
            {"id": 1, "file_name": "1.jpg", "width": 10, "height": 20},
            {"id": 2, "file_name": "2.jpg"},  # no size: accepted, size unknown
            {"file_name": "nid.jpg"},
            {"id": "3", "file_name": "3.jpg"},
            {"id": 4},
            {"id": 1, "file_name": "dup.jpg"},
            {"id": 5, "file_name": "../../etc/passwd"},
            {"id": 6, "file_name": "6.jpg", "width": -1, "height": 5},
            "not a row",
            {"id": True, "file_name": "t.jpg"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "a cat"},
            {"id": 11, "image_id": 2, "caption": "a dog"},
            {"id": 10, "image_id": 2, "caption": "duplicate id"},
            {"id": 12, "image_id": 1, "caption": 7},
            {"id": 13, "image_id": 1},
            {"id": 14.0, "image_id": 1, "caption": "float id"},
            {"id": 15, "image_id": 99, "caption": "no such image"},
            {"id": 16, "image_id": 4, "caption": "image without file name"},
            {"image_id": 1, "caption": "no id"},
        ],
    }
    ann = read_caption_annotations(_write(tmp_path / "captions_x.json", data))

    assert ann.images["image_id"].tolist() == [1, 2]
    assert ann.images["file_name"].tolist() == ["1.jpg", "2.jpg"]
    assert ann.images["width"].iloc[0] == 10 and ann.images["width"].isna().iloc[1]
    assert ann.captions["caption_id"].tolist() == [10, 11]
    assert ann.captions["caption"].tolist() == ["a cat", "a dog"]

    problems = dict(zip(ann.problems["key"], ann.problems["reason"], strict=True))
    assert problems == {
        "images[2]": "missing_field",
        "images[3]": "non_integer_id",
        "images[4]": "missing_file_name",
        "images[5]": "duplicate_image_id",
        "images[6]": "unsafe_file_name",
        "images[7]": "invalid_size",
        "images[8]": "not_an_object",
        "images[9]": "non_integer_id",
        "annotations[2]": "duplicate_caption_id",
        "annotations[3]": "caption_not_string",
        "annotations[4]": "missing_field",
        "annotations[5]": "non_integer_id",
        "annotations[6]": "unknown_image_id",
        "annotations[7]": "image_rejected",
        "annotations[8]": "missing_field",
    }
    # Every input row is either taken or reported.
    assert len(ann.images) + len(ann.captions) + len(ann.problems) == len(data["images"]) + len(
        data["annotations"]
    )
    detail = ann.problems.set_index("key")["detail"]
    assert "images[0]" in detail["images[5]"]
    assert "missing_file_name" in detail["annotations[7]"]


def test_empty_file_has_typed_columns(tmp_path: Path) -> None:
    ann = read_caption_annotations(
        _write(tmp_path / "captions_x.json", {"images": [], "annotations": []})
    )
    assert list(ann.images.columns) == ["image_id", "file_name", "width", "height"]
    assert list(ann.captions.columns) == ["caption_id", "image_id", "caption"]
    assert list(ann.problems.columns) == ["key", "reason", "detail"]
    assert str(ann.images["image_id"].dtype) == "int64"


def test_write_json_atomic_round_trips(tmp_path: Path) -> None:
    data = {
        "images": [{"id": 1, "file_name": "é.jpg"}],
        "annotations": [{"id": 2, "image_id": 1, "caption": "x"}],
    }
    path = write_json_atomic(caption_file(tmp_path, "s"), data)
    assert json.loads(path.read_text(encoding="utf-8")) == data
    assert [p.name for p in path.parent.iterdir()] == ["captions_s.json"]
