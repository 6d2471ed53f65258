"""The COCO caption layout: `annotations/captions_<split>.json` beside `<split>/<file_name>`.

Reading is strict about the file and lenient about rows: a file that is not JSON or lacks the
`images`/`annotations` lists raises, while each row that cannot be taken is reported in
`problems` with a reason so the caller can quarantine it instead of losing it silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import pandas as pd

from bitmar_model.io import atomic_write_json

ANNOTATIONS_DIR = "annotations"
CAPTIONS_PREFIX = "captions_"

PROBLEM_COLUMNS = ("key", "reason", "detail")

# Row-level problem reasons (the `reason` column of `problems`).
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
NON_INTEGER_ID = "non_integer_id"
MISSING_FILE_NAME = "missing_file_name"
UNSAFE_FILE_NAME = "unsafe_file_name"
INVALID_SIZE = "invalid_size"
CAPTION_NOT_STRING = "caption_not_string"
DUPLICATE_IMAGE_ID = "duplicate_image_id"
DUPLICATE_CAPTION_ID = "duplicate_caption_id"
UNKNOWN_IMAGE_ID = "unknown_image_id"
IMAGE_REJECTED = "image_rejected"


class AnnotationFileError(ValueError):
    """A whole annotation file is unusable (not JSON, truncated, wrong top-level structure)."""


@dataclass(frozen=True)
class CaptionAnnotations:
    """One parsed caption file. `problems` holds the rows that were not taken (key, reason, detail);
    keys are JSON paths such as `images[3]` so a person can find the row in the file."""

    source: Path
    images: pd.DataFrame
    captions: pd.DataFrame
    problems: pd.DataFrame


def caption_file(root: Path, split: str) -> Path:
    return Path(root) / ANNOTATIONS_DIR / f"{CAPTIONS_PREFIX}{split}.json"


def image_dir(root: Path, split: str) -> Path:
    return Path(root) / split


def discover_caption_files(root: Path) -> dict[str, Path]:
    """Split name -> caption annotation file, for every `annotations/captions_<split>.json`."""
    root = Path(root)
    found = {
        path.name[len(CAPTIONS_PREFIX) : -len(".json")]: path
        for path in sorted((root / ANNOTATIONS_DIR).glob(f"{CAPTIONS_PREFIX}*.json"))
        if path.is_file()
    }
    if not found:
        raise FileNotFoundError(
            f"no caption annotations under {root}: expected {ANNOTATIONS_DIR}/{CAPTIONS_PREFIX}<split>.json"
        )
    return found


def load_annotation_json(path: Path) -> dict[str, Any]:
    """Parse a caption file and check its top-level structure; rows are not inspected here."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise AnnotationFileError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} (char {exc.pos}): {exc.msg}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise AnnotationFileError(
            f"{path}: not UTF-8 text at byte {exc.start}: {exc.reason}"
        ) from exc
    _check_structure(data, path)
    return data


def read_caption_annotations(path: Path) -> CaptionAnnotations:
    path = Path(path)
    return parse_caption_annotations(load_annotation_json(path), path)


Problem = tuple[str, str, str]  # (key, reason, detail): one row of `problems`


def parse_caption_annotations(data: dict[str, Any], source: Path) -> CaptionAnnotations:
    """Split rows into accepted images/captions and problems. The first row carrying an id owns
    it; later rows with the same id are duplicates, whatever else is wrong with the first."""
    source = Path(source)
    _check_structure(data, source)
    problems: list[Problem] = []
    images, rejected_images = _accepted_images(data["images"], problems)
    captions = _accepted_captions(data["annotations"], images, rejected_images, problems)
    return CaptionAnnotations(
        source=source,
        images=_images_frame(images),
        captions=_captions_frame(captions),
        problems=pd.DataFrame(
            {
                name: pd.Series([p[i] for p in problems], dtype="str")
                for i, name in enumerate(PROBLEM_COLUMNS)
            }
        ),
    )


def _unique_id(
    row: Any, collection: str, index: int, owner: dict[int, int], duplicate: str, problems: list[Problem]
) -> int | None:
    """The row's `id`; None (a problem appended) when it is not a valid id or an earlier row of
    `collection` already holds it (`owner`: id -> that row's index)."""
    key = f"{collection}[{index}]"
    row_id = _row_id(row, "id", key, problems)
    if row_id is None:
        return None
    if row_id in owner:
        problems.append((key, duplicate, f"id {row_id} already used by {collection}[{owner[row_id]}]"))
        return None
    owner[row_id] = index
    return row_id


def _accepted_images(
    rows: list[Any], problems: list[Problem]
) -> tuple[dict[int, tuple[str, int | None, int | None]], dict[int, str]]:
    """(image id -> (file name, width, height), rejected image id -> reason); problems appended."""
    images: dict[int, tuple[str, int | None, int | None]] = {}
    image_owner: dict[int, int] = {}
    rejected_images: dict[int, str] = {}
    for index, row in enumerate(rows):
        image_id = _unique_id(row, "images", index, image_owner, DUPLICATE_IMAGE_ID, problems)
        if image_id is None:
            continue
        reason = _check_image_row(row, f"images[{index}]", problems)
        if reason is not None:
            rejected_images[image_id] = reason
            continue
        images[image_id] = (row["file_name"], row.get("width"), row.get("height"))
    return images, rejected_images


def _accepted_captions(
    rows: list[Any], images: dict[int, Any], rejected_images: dict[int, str], problems: list[Problem]
) -> list[tuple[int, int, str]]:
    """(caption id, image id, caption) of the usable annotation rows; problems appended."""
    captions: list[tuple[int, int, str]] = []
    caption_owner: dict[int, int] = {}
    for index, row in enumerate(rows):
        key = f"annotations[{index}]"
        caption_id = _unique_id(row, "annotations", index, caption_owner, DUPLICATE_CAPTION_ID, problems)
        if caption_id is None:
            continue
        image_id = _row_id(row, "image_id", key, problems)
        if image_id is None:
            continue
        problem = _caption_problem(row, key, caption_id, image_id, images, rejected_images)
        if problem is not None:
            problems.append(problem)
            continue
        captions.append((caption_id, image_id, row["caption"]))
    return captions


def _caption_problem(
    row: dict[str, Any],
    key: str,
    caption_id: int,
    image_id: int,
    images: dict[int, Any],
    rejected_images: dict[int, str],
) -> Problem | None:
    """Why an annotation row with valid ids cannot be used, or None when it can."""
    if "caption" not in row:
        return (key, MISSING_FIELD, f"caption {caption_id} has no 'caption'")
    if not isinstance(row["caption"], str):
        kind = type(row["caption"]).__name__
        return (key, CAPTION_NOT_STRING, f"caption {caption_id}: caption is {kind}: {row['caption']!r:.80}")
    if image_id in rejected_images:
        return (
            key,
            IMAGE_REJECTED,
            f"caption {caption_id}: image {image_id} was rejected ({rejected_images[image_id]})",
        )
    if image_id not in images:
        return (key, UNKNOWN_IMAGE_ID, f"caption {caption_id}: no image with id {image_id} in the file")
    return None


def write_json_atomic(path: Path, data: dict[str, Any]) -> Path:
    """Write COCO JSON in its compact form, atomically (bitmar_model.io): a reader sees the old
    file or the new one, never half of it. The temporary name does not match `captions_*.json`."""
    return atomic_write_json(path, data, ensure_ascii=False, separators=(",", ":"))


def _check_structure(data: Any, path: Path) -> None:
    if not isinstance(data, dict):
        raise AnnotationFileError(f"{path}: top level is {type(data).__name__}, expected an object")
    for key in ("images", "annotations"):
        if key not in data:
            raise AnnotationFileError(f"{path}: missing top-level key {key!r}")
        if not isinstance(data[key], list):
            raise AnnotationFileError(
                f"{path}: top-level key {key!r} is {type(data[key]).__name__}, expected a list"
            )


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python, but `true` is not an id in JSON.
    return isinstance(value, int) and not isinstance(value, bool)


def _row_id(row: Any, field: str, key: str, problems: list[tuple[str, str, str]]) -> int | None:
    if not isinstance(row, dict):
        problems.append((key, NOT_AN_OBJECT, f"row is {type(row).__name__}, expected an object"))
        return None
    if field not in row:
        problems.append((key, MISSING_FIELD, f"no {field!r}"))
        return None
    if not _is_int(row[field]):
        problems.append((key, NON_INTEGER_ID, f"{field} is {row[field]!r:.80}"))
        return None
    return row[field]


def _check_image_row(
    row: dict[str, Any], key: str, problems: list[tuple[str, str, str]]
) -> str | None:
    """Append the image row's problem, if any, and return its reason."""
    image_id = row["id"]
    file_name = row.get("file_name")
    if not isinstance(file_name, str) or not file_name.strip():
        problems.append(
            (key, MISSING_FILE_NAME, f"image {image_id}: file_name is {file_name!r:.80}")
        )
        return MISSING_FILE_NAME
    if not _is_safe_relative(file_name):
        # The name is joined to `<root>/<split>/`; it must not point anywhere else.
        problems.append(
            (
                key,
                UNSAFE_FILE_NAME,
                f"image {image_id}: file_name {file_name!r:.120} leaves the split folder",
            )
        )
        return UNSAFE_FILE_NAME
    for field in ("width", "height"):
        value = row.get(field)
        if value is not None and not (_is_int(value) and value > 0):
            problems.append((key, INVALID_SIZE, f"image {image_id}: {field} is {value!r:.80}"))
            return INVALID_SIZE
    return None


def _is_safe_relative(name: str) -> bool:
    # Backslashes and drive letters matter when the data is later read on Windows.
    if "\\" in name or "\x00" in name or PureWindowsPath(name).anchor:
        return False
    return all(part not in ("..", ".") for part in PurePosixPath(name).parts)


def _images_frame(images: dict[int, tuple[str, int | None, int | None]]) -> pd.DataFrame:
    ids = list(images)
    rows = list(images.values())
    return pd.DataFrame(
        {
            "image_id": pd.Series(ids, dtype="int64"),
            "file_name": pd.Series([r[0] for r in rows], dtype="str"),
            "width": pd.Series([r[1] for r in rows], dtype="Int64"),
            "height": pd.Series([r[2] for r in rows], dtype="Int64"),
        }
    )


def _captions_frame(captions: list[tuple[int, int, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "caption_id": pd.Series([c[0] for c in captions], dtype="int64"),
            "image_id": pd.Series([c[1] for c in captions], dtype="int64"),
            "caption": pd.Series([c[2] for c in captions], dtype="str"),
        }
    )
