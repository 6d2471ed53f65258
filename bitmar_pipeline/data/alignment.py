"""Image-caption alignment for one shard: join, validate, normalise, de-duplicate.

Accounting rule: every caption row given to `align_shard` ends either in `pairs` or in
`quarantine` (reason per row), and every image without a surviving caption is quarantined
too, so `len(pairs) + caption rows quarantined == captions in`, exactly.
"""

from __future__ import annotations

import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bitmar_pipeline.data.images import ImageCheck, check_image

PAIR_COLUMNS = [
    "image_id", "caption_id", "caption", "split", "file_name", "width", "height", "format", "content_hash", "shard",
]
_WHITESPACE = re.compile(r"\s+")


@dataclass
class AlignmentResult:
    pairs: pd.DataFrame
    quarantine: pd.DataFrame  # source, key, reason, detail
    images_checked: int
    images_ok: int


def normalize_caption(value: object, min_chars: int, max_chars: int) -> tuple[str | None, str]:
    """Return (normalised caption, "") or (None, reason)."""
    if not isinstance(value, str):
        return None, "caption_not_text"
    # NFKC folds compatibility forms (full-width letters, ligatures) so equal captions compare equal.
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", value)).strip()
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C")
    if not text:
        return None, "empty_caption"
    if len(text) < min_chars:
        return None, "caption_too_short"
    if len(text) > max_chars:
        return None, "caption_too_long"
    return text, ""


def _quarantine_row(source: str, key: str, reason: str, detail: str) -> dict[str, str]:
    return {"source": source, "key": key, "reason": reason, "detail": detail}


def _caption_rows(
    image: Any,
    result: ImageCheck,
    image_captions: pd.DataFrame | None,
    shard: str,
    caption_chars: tuple[int, int],
    quarantine: list[dict[str, str]],
) -> list[dict]:
    """The pair rows of one accepted image: normalized captions, case-insensitive duplicates
    dropped; refused captions are appended to `quarantine`."""
    source = f"{image.split}/{image.file_name}"
    rows: list[dict] = []
    seen: set[str] = set()
    for caption in () if image_captions is None else image_captions.itertuples(index=False):
        text, reason = normalize_caption(caption.caption, *caption_chars)
        key = f"caption:{caption.caption_id}"
        if text is None:
            quarantine.append(_quarantine_row(source, key, reason, repr(caption.caption)[:200]))
            continue
        dedup_key = text.casefold()
        if dedup_key in seen:
            quarantine.append(_quarantine_row(source, key, "duplicate_caption", text[:200]))
            continue
        seen.add(dedup_key)
        rows.append(
            {
                "image_id": int(image.image_id),
                "caption_id": int(caption.caption_id),
                "caption": text,
                "split": image.split,
                "file_name": image.file_name,
                "width": result.width,
                "height": result.height,
                "format": result.format,
                "content_hash": result.content_hash,
                "shard": shard,
            }
        )
    return rows


def align_shard(
    images: pd.DataFrame,
    captions: pd.DataFrame,
    dataset_root: Path,
    shard: str,
    min_caption_chars: int = 3,
    max_caption_chars: int = 512,
    max_image_pixels: int = 40_000_000,
    workers: int = 4,
) -> AlignmentResult:
    """Align the images of one shard with their captions.

    `images`: image_id, split, file_name. `captions`: caption_id, image_id, caption (only the
    captions of these images). File names are relative to `<dataset_root>/<split>/`.
    """
    rows: list[dict] = []
    quarantine: list[dict[str, str]] = []
    dataset_root = Path(dataset_root)

    def check(row: pd.Series) -> ImageCheck:
        # Confine to the dataset root (not just the split folder): "../val2017/x.jpg" is legal COCO.
        return check_image(dataset_root, f"{row.split}/{row.file_name}", max_image_pixels)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        checks = dict(zip(images["image_id"], pool.map(check, images.itertuples(index=False)), strict=True))

    captions_by_image = {image_id: group for image_id, group in captions.groupby("image_id", sort=False)}
    for image in images.itertuples(index=False):
        result = checks[image.image_id]
        image_captions = captions_by_image.get(image.image_id)
        source = f"{image.split}/{image.file_name}"
        if not result.ok:
            quarantine.append(_quarantine_row(source, f"image:{image.image_id}", result.reason, result.detail))
            for caption in () if image_captions is None else image_captions.itertuples(index=False):
                quarantine.append(
                    _quarantine_row(
                        source,
                        f"caption:{caption.caption_id}",
                        f"image_{result.reason}",
                        f"image {image.image_id} refused",
                    )
                )
            continue
        kept = _caption_rows(image, result, image_captions, shard, (min_caption_chars, max_caption_chars), quarantine)
        rows.extend(kept)
        if not kept:
            quarantine.append(
                _quarantine_row(source, f"image:{image.image_id}", "no_valid_captions", "image has no usable caption")
            )

    pairs = pd.DataFrame(rows, columns=PAIR_COLUMNS).astype(
        {"image_id": "int64", "caption_id": "int64", "width": "int64", "height": "int64"}
    )
    return AlignmentResult(
        pairs=pairs,
        quarantine=pd.DataFrame(quarantine, columns=["source", "key", "reason", "detail"]),
        images_checked=len(images),
        images_ok=sum(1 for c in checks.values() if c.ok),
    )
