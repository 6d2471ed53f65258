from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from bitmar_pipeline.data.coco_layout import discover_caption_files, read_caption_annotations
from bitmar_pipeline.data.coco_sample import (
    BACKGROUNDS,
    COLORS,
    SHAPE_WORDS,
    generate_sample_coco,
)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_is_readable_and_complete(tmp_path: Path) -> None:
    root = generate_sample_coco(
        tmp_path / "s", num_images=40, seed=3, image_size=64, split="mysplit"
    )
    files = discover_caption_files(root)
    assert list(files) == ["mysplit"]
    ann = read_caption_annotations(files["mysplit"])
    assert ann.problems.empty
    assert len(ann.images) == 40
    assert ann.captions.groupby("image_id").size().eq(5).all()
    for name in ann.images["file_name"]:
        with Image.open(root / "mysplit" / name) as image:
            assert image.size == (64, 64) and image.mode == "RGB"


def test_same_seed_byte_identical_other_seed_differs(tmp_path: Path) -> None:
    a = _hashes(generate_sample_coco(tmp_path / "a", num_images=25, seed=7))
    b = _hashes(generate_sample_coco(tmp_path / "b", num_images=25, seed=7))
    c = _hashes(generate_sample_coco(tmp_path / "c", num_images=25, seed=8))
    assert a == b
    assert len(a) == 25 + 2  # images, captions file, marker
    assert a["annotations/captions_train2017.json"] != c["annotations/captions_train2017.json"]


def test_captions_describe_what_is_drawn(tmp_path: Path) -> None:
    root = generate_sample_coco(tmp_path, num_images=60, seed=1)
    data = json.loads((root / "annotations" / "captions_train2017.json").read_text())
    captions: dict[int, list[str]] = {}
    for row in data["annotations"]:
        captions.setdefault(row["image_id"], []).append(row["caption"])
    all_colors = set(COLORS)
    for image in data["images"]:
        scene = image["scene"]
        pixels = Image.open(root / "train2017" / image["file_name"]).convert("RGB")
        assert max(pixels.getcolors())[1] == BACKGROUNDS[scene["background"]]  # most common colour
        drawn_colors = {o["color"] for o in scene["objects"]}
        for obj in scene["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            # The centre of every shape (circle, star, triangle, ...) is painted in its colour.
            assert pixels.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == COLORS[obj["color"]]
        texts = captions[image["id"]]
        assert len(texts) == 5 and len(set(texts)) == 5
        for text in texts:
            words = set(text.lower().rstrip(".").replace(",", " ").replace(":", " ").split())
            # Every drawn colour is named, no undrawn colour is, and every object's shape is named.
            assert drawn_colors <= words and not (all_colors - drawn_colors) & words, text
            for obj in scene["objects"]:
                assert any(w in text.lower() for w in SHAPE_WORDS[obj["shape"]]), text


def test_smaller_set_is_prefix_of_larger(tmp_path: Path) -> None:
    small = _hashes(generate_sample_coco(tmp_path / "small", num_images=5, seed=2))
    large = _hashes(generate_sample_coco(tmp_path / "large", num_images=12, seed=2))
    for name, digest in small.items():
        if name.startswith("train2017/"):
            assert large[name] == digest


def test_reuse_and_regenerate(tmp_path: Path) -> None:
    generate_sample_coco(tmp_path, num_images=10, seed=0)
    marker = tmp_path / ".bitmar-sample-train2017.json"
    first = _hashes(tmp_path)
    stamp = marker.stat().st_mtime_ns
    generate_sample_coco(tmp_path, num_images=10, seed=0)
    assert marker.stat().st_mtime_ns == stamp  # reused, not rebuilt

    generate_sample_coco(tmp_path, num_images=4, seed=0)
    assert len(list((tmp_path / "train2017").iterdir())) == 4
    assert json.loads(marker.read_text())["num_images"] == 4
    assert _hashes(tmp_path) != first
    assert not list(tmp_path.glob(".sample-*")) and not list(tmp_path.glob(".tmp-*"))


def test_incomplete_previous_run_is_rebuilt(tmp_path: Path) -> None:
    generate_sample_coco(tmp_path, num_images=6, seed=0)
    marker = tmp_path / ".bitmar-sample-train2017.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "complete": False}))
    (tmp_path / "train2017" / "000000000001.png").unlink()  # as if killed mid-way
    generate_sample_coco(tmp_path, num_images=6, seed=0)
    assert json.loads(marker.read_text())["complete"] is True
    assert len(list((tmp_path / "train2017").iterdir())) == 6


def test_second_split_beside_first(tmp_path: Path) -> None:
    generate_sample_coco(tmp_path, num_images=3, split="train2017")
    generate_sample_coco(tmp_path, num_images=2, split="val2017")
    assert sorted(discover_caption_files(tmp_path)) == ["train2017", "val2017"]
    assert len(list((tmp_path / "train2017").iterdir())) == 3


def test_refuses_to_overwrite_foreign_data(tmp_path: Path) -> None:
    (tmp_path / "train2017").mkdir()
    (tmp_path / "train2017" / "real.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="train2017"):
        generate_sample_coco(tmp_path, num_images=2)
    assert (tmp_path / "train2017" / "real.jpg").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_images": 0}, "num_images"),
        ({"image_size": 8}, "image_size"),
        ({"split": "../x"}, "split"),
    ],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_sample_coco(tmp_path, **kwargs)


def test_thousand_images(tmp_path: Path) -> None:
    # How long this takes is measured by benchmarks/speed.py, not asserted here.
    generate_sample_coco(tmp_path, num_images=1000)
    assert len(list((tmp_path / "train2017").iterdir())) == 1000
