"""Atomic file and directory writes, and file digests: the one place that writes to a temporary
name and renames.

Every write goes to a unique hidden name beside its target (`.tmp-<name>.<random>`, created
exclusively, so two writers never share one), is fsynced, and is renamed over the target; the
directory is fsynced after the rename so the rename itself survives a crash. A reader sees the
old file or the complete new one; a failed write leaves the target untouched and removes its
temporary file.

    atomic_path(path)           context manager: a temporary path to write, renamed on success
    atomic_write_bytes/_text/_json(path, ...)
    publish_file(source, path)  fsync + rename + fsync dir, for a file written elsewhere
    atomic_directory(path)      context manager: a staging directory, swapped in on success
    replace_directory(staging, path)
    publish_directory_once(staging, path)  rename in unless `path` is already there
    read_json(path, on_error)   parsed JSON, or the caller's error naming why not
    check_stored_tensors(source, expected, stored)  a loaded state dict has the model's names and shapes
    sha256_file(path)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

# Every temporary name starts with this, so listings (Parquet globs, leftovers checks) skip them.
TMP_PREFIX = ".tmp-"
_CHUNK_BYTES = 1 << 20


def temp_name(path: Path) -> Path:
    """A fresh hidden name beside `path`: same directory, so the final rename stays atomic."""
    return path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex}")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    # Makes a rename durable; some platforms cannot open or fsync a directory, so best effort.
    with contextlib.suppress(OSError):
        fsync_file(directory)


def publish_file(source: Path, path: Path, sync: bool = True) -> Path:
    """Make the complete file `source` durable and rename it to `path` (same filesystem).
    `sync=False` keeps the rename atomic but skips both fsyncs (bulk files that can be redone)."""
    if sync:
        fsync_file(source)
    os.replace(source, path)
    if sync:
        fsync_directory(path.parent)
    return path


def _reserve(path: Path) -> Path:
    """Create a unique temporary file beside `path` (exclusive create, so no other writer holds
    the name). Not mkstemp: its 0600 mode would survive the rename; this honours the umask."""
    while True:
        tmp = temp_name(path)
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:  # a uuid4 collision: practically never, but never share a name
            continue


@contextlib.contextmanager
def atomic_path(path: str | Path, sync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; on a normal exit it replaces
    `path`, on an exception it is deleted and `path` keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _reserve(path)
    try:
        yield tmp
        publish_file(tmp, path, sync=sync)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, data: Any, **dumps_options: Any) -> Path:
    """`json.dumps(data, **dumps_options)` written atomically as UTF-8."""
    return atomic_write_text(path, json.dumps(data, **dumps_options))


def read_json(path: str | Path, on_error: Callable[[Exception], Exception]) -> Any:
    """The parsed JSON of `path`; a file that cannot be read, decoded as UTF-8 or parsed raises
    `on_error(cause)` (the caller's error type and message) from the cause."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise on_error(exc) from exc


def check_stored_tensors(source: Path, expected: Mapping[str, Any], stored: Mapping[str, Any], noun: str) -> None:
    """Raise ValueError naming `source` unless `stored` (tensors read from it) holds exactly the
    names of `expected` (a module's state dict), each with the same shape; `noun` names an entry
    in the message ("key", "tensor")."""
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: missing {noun}s {missing}, unexpected {noun}s {unexpected}")
    for name, current in expected.items():
        if stored[name].shape != current.shape:
            raise ValueError(
                f"{source}: {noun} {name!r} has shape {tuple(stored[name].shape)}, expected {tuple(current.shape)}"
            )


def fsync_tree(directory: Path) -> None:
    """fsync every file and folder under `directory` (and itself) before it is renamed."""
    for entry in sorted(directory.rglob("*"), reverse=True):
        if entry.is_file() and not entry.is_symlink():
            fsync_file(entry)
        elif entry.is_dir():
            fsync_directory(entry)
    fsync_directory(directory)


def replace_directory(staging: Path, path: Path) -> Path:
    """Rename the complete directory `staging` to `path`. An existing `path` is renamed aside
    first (a directory cannot be renamed over a non-empty one) and deleted after, so readers
    see the old or the new tree, never a mix."""
    staging, path = Path(staging), Path(path)
    if path.exists():
        aside = path.with_name(f"{TMP_PREFIX}{path.name}.old-{uuid.uuid4().hex}")
        path.rename(aside)
        staging.rename(path)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        staging.rename(path)
    fsync_directory(path.parent)
    return path


def publish_directory_once(staging: Path, path: Path) -> bool:
    """Rename the complete directory `staging` to `path` unless a non-empty `path` is already
    there (another writer finished first): then `staging` is deleted and `path` kept. For builds
    whose every result is identical, where racing writers must not pull a tree from under a reader."""
    try:
        Path(staging).rename(path)
    except OSError:  # a directory cannot be renamed over a non-empty one
        shutil.rmtree(staging, ignore_errors=True)
        return False
    fsync_directory(Path(path).parent)
    return True


@contextlib.contextmanager
def atomic_directory(path: str | Path, sync: bool = True, replace: bool = True) -> Iterator[Path]:
    """Yield an empty staging directory beside `path`; on a normal exit its files are fsynced
    and it replaces `path`, on an exception it is deleted and `path` is untouched.
    `sync=False` skips the fsyncs of the files (bulk trees that can be redone); `replace=False`
    keeps an existing `path` and drops the new tree (`publish_directory_once`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_name(path)
    staging.mkdir()
    try:
        yield staging
        if sync:
            fsync_tree(staging)
        if replace:
            replace_directory(staging, path)
        else:
            publish_directory_once(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of the file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()
