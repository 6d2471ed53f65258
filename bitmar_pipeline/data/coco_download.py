"""The official COCO 2017 captions source: resumable, verified downloads and safe zip extraction.

Layout written under `root` (the COCO-layout root that is returned):

    annotations/captions_<split>.json        what readers use (trimmed when max_images is set)
    <split>/<file_name>                      images
    downloads/annotations_trainval2017.zip   the verified archive, kept
    downloads/annotations/captions_<split>.json   the original, untrimmed captions file
    downloads/<split>.zip.extracted          marks a fully extracted image zip (the zip is then removed)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import time
import zipfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from tqdm import tqdm

from bitmar_model.io import atomic_path, publish_file
from bitmar_pipeline.data.coco_layout import (
    caption_file,
    image_dir,
    load_annotation_json,
    parse_caption_annotations,
    write_json_atomic,
)

COCO_ANNOTATIONS_URL = "http://images.cocodataset.org/annotations/annotations_trainval2017.zip"
COCO_IMAGE_URL = "http://images.cocodataset.org/{split}/{file_name}"
COCO_IMAGE_ZIP_URL = "http://images.cocodataset.org/zips/{split}.zip"


@dataclass(frozen=True)
class PublishedFile:
    size: int
    md5: str


# Published sizes and md5 sums, keyed by URL: a mirror at another URL is checked against its
# Content-Length only, since nothing says it serves the same bytes.
PUBLISHED: dict[str, PublishedFile] = {
    COCO_ANNOTATIONS_URL: PublishedFile(252_907_541, "f4bbac642086de4f52a3fdda2de5fa2c"),
    COCO_IMAGE_ZIP_URL.format(split="train2017"): PublishedFile(
        19_336_861_798, "cced6f7f71b7629ddf16f17bbcfab6b2"
    ),
    COCO_IMAGE_ZIP_URL.format(split="val2017"): PublishedFile(
        815_585_330, "442b8da7639aecaf257c1dceb8ba8c80"
    ),
}

DOWNLOADS_DIR = "downloads"
# Small enough that a dropped connection loses little: a chunk cut short is not written.
CHUNK_BYTES = 1 << 16
DEFAULT_TIMEOUT = (30.0, 120.0)  # (connect, read) seconds
MAX_BACKOFF_S = 60.0
_RETRY_STATUSES = {408, 429}

ProgressCallback = Callable[[int, int | None], None]
"""(bytes_done, total_bytes or None) while one file downloads."""

StageProgress = Callable[[str, int, int | None, str], None]
"""(stage, done, total or None, unit) for download_coco: unit "B" for archives, "file" for
extraction and single-image fetches."""


class DownloadError(RuntimeError):
    """A download failed for good (HTTP error, or retries exhausted)."""


class VerificationError(DownloadError):
    """The bytes received are not the expected ones (size or md5)."""


class UnsafeArchiveError(ValueError):
    """A zip member would be written outside the target folder."""


class _TransientError(Exception):
    """Worth another attempt: 5xx, throttling, or a body that ended early."""


_RETRYABLE = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    _TransientError,
)


class TqdmProgress:
    """tqdm bars for the CLI. Call it as a StageProgress (one bar per stage), or pass
    `.file(name)` to download_file. Use as a context manager so the bars are closed."""

    def __init__(self) -> None:
        self._bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int | None, unit: str = "B") -> None:
        bar = self._bars.get(stage)
        if bar is None:
            in_bytes = unit == "B"
            bar = tqdm(
                desc=stage,
                total=total,
                unit=unit,
                unit_scale=in_bytes,
                unit_divisor=1024 if in_bytes else 1000,
            )
            self._bars[stage] = bar
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    def file(self, name: str) -> ProgressCallback:
        return lambda done, total: self(name, done, total, "B")

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def download_file(
    url: str,
    dest: Path,
    expected_size: int | None = None,
    expected_md5: str | None = None,
    session: requests.Session | None = None,
    progress: ProgressCallback | None = None,
    retries: int = 3,
    *,
    backoff_s: float = 1.0,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
) -> Path:
    """Fetch url to dest through `dest.part`, resuming from the part file with an HTTP Range.

    dest appears (atomic rename) only once size and md5 match; a mismatch deletes the part file
    and raises VerificationError. An existing dest of the expected size is taken as done, without
    a request or re-hash: it can only have got there through this verification."""
    dest = Path(dest)
    if dest.is_file() and (expected_size is None or dest.stat().st_size == expected_size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    own_session = session is None
    session = session or requests.Session()
    try:
        for attempt in range(retries + 1):
            try:
                _fetch_to_part(session, url, part, expected_size, progress, timeout)
                break
            except _RETRYABLE as exc:
                if attempt == retries:
                    raise DownloadError(
                        f"{url}: failed after {attempt + 1} attempts: {exc}"
                    ) from exc
                time.sleep(min(backoff_s * 2**attempt, MAX_BACKOFF_S))
    finally:
        if own_session:
            session.close()
    _verify(part, url, expected_size, expected_md5)
    # The part file is the resume state, not a temporary name: only its final move is shared.
    return publish_file(part, dest)


def safe_extract_zip(
    zip_path: Path,
    target_dir: Path,
    members: Iterable[str] | None = None,
    progress: ProgressCallback | None = None,
) -> list[Path]:
    """Extract members (all when None) under target_dir and return the files' paths.

    Every selected member is checked before anything is written: absolute names, drive letters,
    `..` parts and symlink entries raise UnsafeArchiveError naming the member. Each file is
    written to a temporary name and renamed, so no half-written file is visible; a file already
    present with the member's size is kept, which makes an interrupted extraction resumable.
    `progress` gets (members_done, members_total)."""
    zip_path, target_dir = Path(zip_path), Path(target_dir)
    base = Path(os.path.abspath(target_dir))
    try:
        with zipfile.ZipFile(zip_path) as archive:
            infos = _select_members(archive, zip_path, members)
            plan = [(info, _member_target(info, base, zip_path)) for info in infos]
            written = []
            for done, (info, dest) in enumerate(plan, 1):
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                else:
                    if not (dest.is_file() and dest.stat().st_size == info.file_size):
                        _extract_member(archive, info, dest)
                    written.append(dest)
                if progress is not None:
                    progress(done, len(plan))
    except zipfile.BadZipFile as exc:
        raise zipfile.BadZipFile(f"{zip_path}: {exc}") from exc
    return written


def download_coco(
    root: Path,
    split: str = "train2017",
    max_images: int | None = None,
    annotations_url: str = COCO_ANNOTATIONS_URL,
    image_base_url: str | None = None,
    session: requests.Session | None = None,
    progress: StageProgress | None = None,
    workers: int = 8,
    *,
    image_zip_url: str | None = None,
) -> Path:
    """Fetch COCO 2017 captions and images for one split into a COCO layout under root.

    With max_images, only the first max_images image ids (sorted, so deterministic) are fetched
    one by one, from image_base_url (a template with {split} and {file_name}) when given, else
    from each image's `coco_url`; `annotations/captions_<split>.json` then lists only them. Without
    it, the split's image zip (image_zip_url, default the official one) is fetched and extracted.
    Everything already complete is skipped, so a re-run makes no requests."""
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be at least 1 or None, got {max_images}")
    root = Path(root)
    own_session = session is None
    session = session or _pooled_session(workers)
    try:
        original = _fetch_captions(root, split, annotations_url, session, progress)
        # The layout's captions file is written last: once it is there, its images are too.
        if max_images is None:
            _fetch_image_zip(
                root,
                split,
                image_zip_url or COCO_IMAGE_ZIP_URL.format(split=split),
                session,
                progress,
            )
            _copy_atomic(original, caption_file(root, split))
        else:
            data = load_annotation_json(original)
            selected = _select_images(data, original, max_images)
            urls = {
                image_id: _image_url(entry, split, image_base_url)
                for image_id, entry in selected.items()
            }
            targets = {
                image_id: image_dir(root, split) / entry["file_name"]
                for image_id, entry in selected.items()
            }
            _fetch_images(urls, targets, split, session, progress, workers)
            write_json_atomic(caption_file(root, split), _trimmed(data, selected))
    finally:
        if own_session:
            session.close()
    return root


# Downloading -------------------------------------------------------------------------------


def _fetch_to_part(
    session: requests.Session,
    url: str,
    part: Path,
    expected_size: int | None,
    progress: ProgressCallback | None,
    timeout: float | tuple[float, float],
) -> None:
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()  # leftovers of some other file
        offset = 0
    if offset and offset == expected_size:
        return
    # identity: a compressed transfer would make Range offsets and sizes refer to other bytes.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with session.get(url, headers=headers, stream=True, timeout=timeout) as resp:
        status = resp.status_code
        if status == 416 and offset:
            total = _content_range_total(resp.headers.get("Content-Range"))
            if total is None or total == offset:
                return  # the part file already holds the whole resource
            part.unlink()
            raise _TransientError(
                f"{url}: server has {total} bytes, {part} holds {offset}; restarting"
            )
        if status >= 500 or status in _RETRY_STATUSES:
            raise _TransientError(f"{url}: HTTP {status} {resp.reason}")
        if status not in (200, 206):
            raise DownloadError(f"{url}: HTTP {status} {resp.reason}")
        if status == 206:
            start, total = _parse_content_range(resp.headers.get("Content-Range"), url)
            if start != offset:
                part.unlink()
                raise _TransientError(
                    f"{url}: asked for bytes from {offset}, got from {start}; restarting"
                )
            mode = "ab"
        else:
            # 200: the whole body, also from servers that ignore Range; start the part file over.
            offset, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if expected_size is not None and total is not None and total != expected_size:
            part.unlink(missing_ok=True)
            raise VerificationError(
                f"{url}: server reports {total} bytes, expected {expected_size}"
            )
        total = total if total is not None else expected_size
        done = offset
        if progress is not None:
            progress(done, total)
        with part.open(mode) as fh:
            for chunk in resp.iter_content(CHUNK_BYTES):
                fh.write(chunk)
                done += len(chunk)
                if total is not None and done > total:
                    part.unlink()
                    raise VerificationError(
                        f"{url}: received more than the {total} bytes announced"
                    )
                if progress is not None:
                    progress(done, total)
        if total is not None and done < total:
            raise _TransientError(f"{url}: connection ended at byte {done} of {total}")


def _verify(part: Path, url: str, expected_size: int | None, expected_md5: str | None) -> None:
    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        part.unlink()
        raise VerificationError(f"{url}: size mismatch: expected {expected_size} bytes, got {size}")
    if expected_md5:
        digest = hashlib.md5(usedforsecurity=False)
        with part.open("rb") as fh:
            for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
                digest.update(block)
        if digest.hexdigest() != expected_md5.lower():
            part.unlink()
            raise VerificationError(
                f"{url}: md5 mismatch: expected {expected_md5}, got {digest.hexdigest()}"
            )


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _parse_content_range(value: str | None, url: str) -> tuple[int, int | None]:
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    if match is None:
        raise _TransientError(f"{url}: 206 with unusable Content-Range {value!r}")
    total = match.group(3)
    return int(match.group(1)), None if total == "*" else int(total)


def _content_range_total(value: str | None) -> int | None:
    match = re.fullmatch(r"bytes \*/(\d+)", (value or "").strip())
    return int(match.group(1)) if match else None


def _pooled_session(workers: int) -> requests.Session:
    session = requests.Session()
    # requests keeps 10 connections per host by default; the image pool needs one per worker.
    adapter = HTTPAdapter(pool_connections=max(workers, 1), pool_maxsize=max(workers, 1))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


# Extraction --------------------------------------------------------------------------------


def _select_members(
    archive: zipfile.ZipFile, zip_path: Path, members: Iterable[str] | None
) -> list[zipfile.ZipInfo]:
    if members is None:
        return archive.infolist()
    by_name = {info.filename: info for info in archive.infolist()}
    wanted = list(members)
    missing = [name for name in wanted if name not in by_name]
    if missing:
        raise ValueError(f"{zip_path}: no member(s) {', '.join(map(repr, missing))}")
    return [by_name[name] for name in wanted]


def _member_target(info: zipfile.ZipInfo, base: Path, zip_path: Path) -> Path:
    name = info.filename
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UnsafeArchiveError(
            f"{zip_path}: member {name!r} is a symbolic link; refusing to extract"
        )
    posix = name.replace("\\", "/")
    if posix.startswith("/") or PureWindowsPath(name).anchor or ".." in PurePosixPath(posix).parts:
        raise UnsafeArchiveError(
            f"{zip_path}: member {name!r} is absolute or climbs out of {base}; refusing to extract"
        )
    # Lexical check rather than resolve(): a user may symlink <root>/<split> to another disk on purpose.
    dest = Path(os.path.normpath(base / posix))
    if base not in dest.parents and not (info.is_dir() and dest == base):
        raise UnsafeArchiveError(f"{zip_path}: member {name!r} resolves to {dest}, outside {base}")
    return dest


def _extract_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path) -> None:
    # zipfile checks the CRC while reading, so a corrupt member raises before the rename. No
    # fsync per member (as before): over 100k images it would dominate extraction time.
    with atomic_path(dest, sync=False) as tmp, archive.open(info) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK_BYTES)


# COCO steps --------------------------------------------------------------------------------


def _file_progress(
    progress: StageProgress | None, stage: str, unit: str = "B"
) -> ProgressCallback | None:
    if progress is None:
        return None
    return lambda done, total: progress(stage, done, total, unit)


def _fetch_captions(
    root: Path, split: str, url: str, session: requests.Session, progress: StageProgress | None
) -> Path:
    """Download and verify the annotations zip; extract the split's captions file; return it."""
    name = PurePosixPath(urlsplit(url).path).name or "annotations.zip"
    published = PUBLISHED.get(url)
    zip_path = download_file(
        url,
        root / DOWNLOADS_DIR / name,
        published.size if published else None,
        published.md5 if published else None,
        session=session,
        progress=_file_progress(progress, name),
    )
    member = f"annotations/captions_{split}.json"
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
    if member not in names:
        available = sorted(n for n in names if re.fullmatch(r"annotations/captions_[^/]+\.json", n))
        raise ValueError(
            f"{url}: no {member} for split {split!r}; caption files in it: {available}"
        )
    (original,) = safe_extract_zip(zip_path, root / DOWNLOADS_DIR, [member])
    return original


def _select_images(
    data: dict[str, Any], source: Path, max_images: int
) -> dict[int, dict[str, Any]]:
    """The first max_images valid image ids in sorted order -> their raw entries."""
    parsed = parse_caption_annotations(data, source)
    ids = sorted(parsed.images["image_id"].tolist())[:max_images]
    first_entry: dict[int, dict[str, Any]] = {}
    for entry in data["images"]:
        if isinstance(entry, dict) and type(entry.get("id")) is int:
            first_entry.setdefault(entry["id"], entry)
    return {image_id: first_entry[image_id] for image_id in ids}


def _trimmed(data: dict[str, Any], selected: dict[int, dict[str, Any]]) -> dict[str, Any]:
    # Captions are kept as they are, bad ones included: the reader reports those as problems.
    return {
        **{k: v for k, v in data.items() if k not in ("images", "annotations")},
        "images": list(selected.values()),
        "annotations": [
            row
            for row in data["annotations"]
            if isinstance(row, dict)
            and type(row.get("image_id")) is int
            and row["image_id"] in selected
        ],
    }


def _image_url(entry: dict[str, Any], split: str, image_base_url: str | None) -> str:
    if image_base_url is not None:
        return image_base_url.format(split=split, file_name=entry["file_name"])
    coco_url = entry.get("coco_url")
    if isinstance(coco_url, str) and coco_url.startswith(("http://", "https://")):
        return coco_url
    return COCO_IMAGE_URL.format(split=split, file_name=entry["file_name"])


def _fetch_images(
    urls: dict[int, str],
    targets: dict[int, Path],
    split: str,
    session: requests.Session,
    progress: StageProgress | None,
    workers: int,
) -> None:
    todo = [image_id for image_id in urls if not targets[image_id].is_file()]
    stage = f"{split} images"
    done = len(urls) - len(todo)
    if progress is not None:
        progress(stage, done, len(urls), "file")
    failures: list[str] = []
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        futures = {
            pool.submit(download_file, urls[image_id], targets[image_id], session=session): image_id
            for image_id in todo
        }
        for future in as_completed(futures):
            error = future.exception()
            if error is not None:
                failures.append(f"image {futures[future]}: {error}")  # the error names the URL
            done += 1
            if progress is not None:
                progress(stage, done, len(urls), "file")
    if failures:
        raise DownloadError(
            f"{len(failures)} of {len(todo)} {split} images failed (the others are kept; re-run to resume): "
            + "; ".join(sorted(failures)[:5])
        )


def _fetch_image_zip(
    root: Path, split: str, url: str, session: requests.Session, progress: StageProgress | None
) -> None:
    marker = root / DOWNLOADS_DIR / f"{split}.zip.extracted"
    if marker.is_file() and image_dir(root, split).is_dir():
        return
    published = PUBLISHED.get(url)
    zip_path = download_file(
        url,
        root / DOWNLOADS_DIR / f"{split}.zip",
        published.size if published else None,
        published.md5 if published else None,
        session=session,
        progress=_file_progress(progress, f"{split}.zip"),
    )
    with zipfile.ZipFile(zip_path) as archive:
        # Only the split's folder: whatever else the archive holds stays out of the layout root.
        members = [n for n in archive.namelist() if n.startswith(f"{split}/")]
    if not members:
        raise ValueError(f"{url}: archive has no {split}/ folder")
    safe_extract_zip(
        zip_path, root, members, progress=_file_progress(progress, f"extract {split}.zip", "file")
    )
    marker.write_text(f"{url}\n", encoding="utf-8")
    zip_path.unlink()  # the extracted images are the data now; the zip would double the disk use


def _copy_atomic(src: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
