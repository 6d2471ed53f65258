"""image_caption_pairs logic on real COCO images plus every bad-input class, with the
accounting rule checked: each caption row ends in pairs or quarantine, exactly once."""

import io
import shutil

import pandas as pd
import pytest
from PIL import Image

from bitmar_pipeline.data.alignment import align_shard, normalize_caption
from bitmar_pipeline.data.images import check_image


def _images(names, split="train2017"):
    return pd.DataFrame({"image_id": range(1, len(names) + 1), "split": split, "file_name": names})


def test_real_coco_mini_aligns_completely(coco_mini):
    import json

    data = json.loads((coco_mini / "annotations" / "captions_train2017.json").read_text())
    images = pd.DataFrame(
        [{"image_id": i["id"], "split": "train2017", "file_name": i["file_name"]} for i in data["images"]]
    )
    captions = pd.DataFrame(
        [{"caption_id": a["id"], "image_id": a["image_id"], "caption": a["caption"]} for a in data["annotations"]]
    )
    result = align_shard(images, captions, coco_mini, "train2017-00000")
    assert result.images_ok == 80
    assert len(result.pairs) + len(result.quarantine) == 400
    assert result.pairs["content_hash"].str.len().eq(64).all()
    assert set(result.pairs["format"]) == {"JPEG"}
    assert (result.pairs["caption"] == result.pairs["caption"].str.strip()).all()


@pytest.fixture
def bad_dataset(tmp_path, coco_mini):
    root = tmp_path / "coco"
    split = root / "train2017"
    split.mkdir(parents=True)
    good = sorted((coco_mini / "train2017").glob("*.jpg"))[:2]
    shutil.copy(good[0], split / "good.jpg")
    shutil.copy(good[1], split / "good2.jpg")
    data = good[0].read_bytes()
    (split / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (split / "empty.jpg").write_bytes(b"")
    (split / "text.jpg").write_text("this is not a jpeg")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    (split / "anim.gif").write_bytes(gif.getvalue())
    big = io.BytesIO()
    Image.new("L", (3000, 3000)).save(big, format="PNG")  # compresses to a few KB
    (split / "bomb.png").write_bytes(big.getvalue())
    webp = io.BytesIO()
    Image.new("RGBA", (20, 10), (255, 0, 0, 128)).save(webp, format="WEBP")
    (split / "alpha.webp").write_bytes(webp.getvalue())
    (tmp_path / "outside.jpg").write_bytes(good[0].read_bytes())
    return root


def test_every_bad_image_class_is_quarantined_with_its_reason(bad_dataset):
    names = [
        "good.jpg",
        "truncated.jpg",
        "empty.jpg",
        "text.jpg",
        "anim.gif",
        "bomb.png",
        "missing.jpg",
        "../../outside.jpg",
        "alpha.webp",
        "good2.jpg",
    ]
    images = _images(names)
    captions = pd.DataFrame(
        {
            "caption_id": range(100, 100 + 2 * len(names)),
            "image_id": [i for i in images["image_id"] for _ in range(2)],
            "caption": [f"A caption for image {i} number {j}" for i in images["image_id"] for j in range(2)],
        }
    )
    result = align_shard(images, captions, bad_dataset, "s", max_image_pixels=5_000_000)
    reasons = dict(
        zip(
            result.quarantine.loc[result.quarantine["key"].str.startswith("image:"), "key"],
            result.quarantine.loc[result.quarantine["key"].str.startswith("image:"), "reason"],
            strict=False,
        )
    )
    assert reasons == {
        "image:2": "corrupt_image",
        "image:3": "empty_file",
        "image:4": "not_an_image",
        "image:5": "unsupported_format",
        "image:6": "decompression_bomb",
        "image:7": "missing_file",
        "image:8": "path_outside_root",
    }
    # Captions of refused images are quarantined too, never silently dropped.
    caption_rows = result.quarantine[result.quarantine["key"].str.startswith("caption:")]
    assert len(caption_rows) == 14
    assert len(result.pairs) + len(caption_rows) == len(captions)
    assert set(result.pairs["image_id"]) == {1, 9, 10}
    assert set(result.pairs.loc[result.pairs["image_id"] == 9, "format"]) == {"WEBP"}


def test_caption_problems_and_duplicates(bad_dataset):
    images = _images(["good.jpg", "good2.jpg"])
    captions = pd.DataFrame(
        {
            "caption_id": [1, 2, 3, 4, 5, 6, 7, 8],
            "image_id": [1, 1, 1, 1, 1, 1, 2, 2],
            "caption": [
                "  A dog\u00a0on a\tcouch.  ",
                "a dog on a couch.",
                "",
                42,
                "x" * 600,
                "ok",
                "\u0000\u200b",
                None,
            ],
        }
    )
    result = align_shard(images, captions, bad_dataset, "s")
    assert result.pairs["caption"].tolist() == ["A dog on a couch."]
    by_key = dict(zip(result.quarantine["key"], result.quarantine["reason"], strict=False))
    assert by_key == {
        "caption:2": "duplicate_caption",
        "caption:3": "empty_caption",
        "caption:4": "caption_not_text",
        "caption:5": "caption_too_long",
        "caption:6": "caption_too_short",
        "caption:7": "empty_caption",
        "caption:8": "caption_not_text",
        "image:2": "no_valid_captions",
    }


def test_normalize_caption_unicode():
    assert normalize_caption("ｆｕｌｌ width\n text", 3, 100) == ("full width text", "")


def test_symlink_escaping_root_is_refused(tmp_path, coco_mini):
    root = tmp_path / "root"
    (root / "train2017").mkdir(parents=True)
    secret = tmp_path / "secret.jpg"
    shutil.copy(next((coco_mini / "train2017").glob("*.jpg")), secret)
    (root / "train2017" / "link.jpg").symlink_to(secret)
    assert check_image(root, "train2017/link.jpg", 10**8).reason == "path_outside_root"
    assert check_image(root, "/etc/passwd", 10**8).reason == "path_outside_root"
