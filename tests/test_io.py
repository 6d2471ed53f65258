"""bitmar_model.io: atomic writes, the directory swap and the file digest."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from bitmar_model import io
from bitmar_model.io import (
    TMP_PREFIX,
    atomic_directory,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    sha256_file,
)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(TMP_PREFIX))


def test_writes_bytes_text_and_json(tmp_path: Path) -> None:
    assert atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert atomic_write_text(tmp_path / "t.txt", "é").read_bytes() == "é".encode()
    path = atomic_write_json(tmp_path / "d.json", {"b": 1, "a": [2]}, sort_keys=True)
    assert path.read_text() == json.dumps({"b": 1, "a": [2]}, sort_keys=True)
    assert _leftovers(tmp_path) == []


def test_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_two_writers_never_share_a_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second
        assert first.parent == second.parent == tmp_path
        assert first.name.startswith(TMP_PREFIX) and second.name.startswith(TMP_PREFIX)
        first.write_text("first")
        second.write_text("second")
        assert first.read_text() == "first"  # the second writer did not touch the first's file
    assert target.read_text() == "first"  # the outer (first) writer renamed last
    assert _leftovers(tmp_path) == []


def test_concurrent_writers_leave_one_complete_file(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    payloads = [bytes([i]) * 100_000 for i in range(8)]
    threads = [threading.Thread(target=atomic_write_bytes, args=(target, p)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert target.read_bytes() in payloads
    assert _leftovers(tmp_path) == []


def test_failed_write_leaves_target_untouched_and_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_failed_serialisation_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "d.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_removes_the_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")

    def refuse(source: object, destination: object) -> None:
        raise OSError("rename refused")

    monkeypatch.setattr(io.os, "replace", refuse)
    with pytest.raises(OSError, match="rename refused"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_directory_swap_replaces_the_whole_tree(tmp_path: Path) -> None:
    target = tmp_path / "release"
    target.mkdir()
    (target / "old_only.txt").write_text("old")
    (target / "shared.txt").write_text("old")
    with atomic_directory(target) as staging:
        assert staging.parent == tmp_path and staging.is_dir() and not any(staging.iterdir())
        (staging / "shared.txt").write_text("new")
        (staging / "sub").mkdir()
        (staging / "sub" / "new_only.txt").write_text("new")
        assert (target / "old_only.txt").read_text() == "old"  # untouched until the swap
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "shared.txt",
        "sub",
        "sub/new_only.txt",
    ]
    assert (target / "shared.txt").read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_directory_swap_into_a_new_path(tmp_path: Path) -> None:
    with atomic_directory(tmp_path / "a" / "model") as staging:
        (staging / "w.bin").write_bytes(b"w")
    assert (tmp_path / "a" / "model" / "w.bin").read_bytes() == b"w"
    assert _leftovers(tmp_path / "a") == []


def test_failed_directory_build_leaves_the_old_tree(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "w.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "w.bin").write_bytes(b"partial")
        raise RuntimeError("killed")
    assert [p.name for p in target.iterdir()] == ["w.bin"]
    assert (target / "w.bin").read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_directory_published_once_keeps_the_first_writers_tree(tmp_path: Path) -> None:
    target = tmp_path / "encoder"
    with atomic_directory(target, replace=False) as first, atomic_directory(target, replace=False) as second:
        (first / "w.bin").write_bytes(b"second to finish")
        (second / "w.bin").write_bytes(b"first to finish")
    assert (target / "w.bin").read_bytes() == b"first to finish"  # the later rename is dropped
    assert _leftovers(tmp_path) == []
    with atomic_directory(target, replace=False, sync=False) as third:
        (third / "w.bin").write_bytes(b"new")
    assert (target / "w.bin").read_bytes() == b"first to finish"


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000  # more than one 1 MiB block
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(path)) == hashlib.sha256(data).hexdigest()


def test_new_file_mode_follows_the_umask(tmp_path: Path) -> None:
    # mkstemp would create 0600 files; a written file must be as readable as open() makes it.
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    assert atomic_write_bytes(tmp_path / "atomic", b"x").stat().st_mode == plain.stat().st_mode
