"""COCO download against a local HTTP server on 127.0.0.1: no network."""

from __future__ import annotations

import hashlib
import io
import json
import re
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from bitmar_pipeline.data.coco_download import (
    DownloadError,
    TqdmProgress,
    UnsafeArchiveError,
    VerificationError,
    download_coco,
    download_file,
    safe_extract_zip,
)
from bitmar_pipeline.data.coco_layout import discover_caption_files, read_caption_annotations
from tests.factories import jpeg_bytes, publish_coco
from tests.http_server import ServerState


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.trust_env = False  # a proxy from the environment must not intercept 127.0.0.1
        yield s


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


BLOB = bytes(range(256)) * 4000  # 1 MB, several chunks


# download_file -------------------------------------------------------------------------------


def test_download_verifies_and_reports_progress(
    server: ServerState, session: requests.Session, tmp_path: Path
) -> None:
    server.files["/blob.bin"] = BLOB
    seen: list[tuple[int, int | None]] = []
    dest = download_file(
        f"{server.base}/blob.bin",
        tmp_path / "blob.bin",
        len(BLOB),
        _md5(BLOB),
        session,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert dest.read_bytes() == BLOB
    assert not (tmp_path / "blob.bin.part").exists()
    assert seen[-1] == (len(BLOB), len(BLOB))
    # Done already: no request at all.
    download_file(f"{server.base}/blob.bin", dest, len(BLOB), _md5(BLOB), session)
    assert len(server.requests) == 1


def test_resume_requests_only_remaining_bytes(
    server: ServerState, session: requests.Session, tmp_path: Path
) -> None:
    server.files["/blob.bin"] = BLOB
    (tmp_path / "blob.bin.part").write_bytes(BLOB[:300_000])
    download_file(f"{server.base}/blob.bin", tmp_path / "blob.bin", len(BLOB), _md5(BLOB), session)
    assert server.requests == [("/blob.bin", "bytes=300000-")]
    assert server.body_bytes_sent == len(BLOB) - 300_000
    assert (tmp_path / "blob.bin").read_bytes() == BLOB


def test_server_ignoring_range_restarts_cleanly(
    server: ServerState, session: requests.Session, tmp_path: Path
) -> None:
    server.files["/blob.bin"] = BLOB
    server.ignore_range = True
    (tmp_path / "blob.bin.part").write_bytes(BLOB[:1000])
    download_file(f"{server.base}/blob.bin", tmp_path / "blob.bin", len(BLOB), _md5(BLOB), session)
    assert (tmp_path / "blob.bin").read_bytes() == BLOB
    assert server.body_bytes_sent == len(BLOB)


def test_part_already_complete_gets_416(
    server: ServerState, session: requests.Session, tmp_path: Path
) -> None:
    server.files["/blob.bin"] = BLOB
    (tmp_path / "blob.bin.part").write_bytes(BLOB)
    download_file(f"{server.base}/blob.bin", tmp_path / "blob.bin", None, _md5(BLOB), session)
    assert server.requests == [("/blob.bin", f"bytes={len(BLOB)}-")]
    assert server.body_bytes_sent == 0
    assert (tmp_path / "blob.bin").read_bytes() == BLOB


def test_retries_500_and_resumes_cut_connection(
    server: ServerState, session: requests.Session, tmp_path: Path
) -> None:
    server.files["/blob.bin"] = BLOB
    server.fail_next, server.cut_next = 1, 1
    download_file(
        f"{server.base}/blob.bin",
        tmp_path / "blob.bin",
        len(BLOB),
        _md5(BLOB),
        session,
        backoff_s=0.01,
    )
    assert (tmp_path / "blob.bin").read_bytes() == BLOB
    ranges = [r for _, r in server.requests]
    assert ranges[:2] == [None, None] and len(ranges) == 3
    # After the cut, only what the part file lacked was asked for (a chunk cut short is dropped).
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", ranges[2]).group(1))
    assert len(BLOB) // 2 - 65536 <= resumed_at <= len(BLOB) // 2
    assert server.body_bytes_sent == len(BLOB) // 2 + len(BLOB) - resumed_at


def test_gives_up_after_retries(
    server: ServerState, session: requests.Session, tmp_path: Path
) -> None:
    server.files["/blob.bin"] = BLOB
    server.fail_next = 10
    with pytest.raises(DownloadError, match=r"/blob\.bin: failed after 3 attempts.*500"):
        download_file(
            f"{server.base}/blob.bin",
            tmp_path / "blob.bin",
            session=session,
            retries=2,
            backoff_s=0.01,
        )
    assert len(server.requests) == 3


def test_404_is_not_retried(server: ServerState, session: requests.Session, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"/missing\.bin: HTTP 404"):
        download_file(
            f"{server.base}/missing.bin", tmp_path / "m.bin", session=session, backoff_s=0.01
        )
    assert len(server.requests) == 1


def test_md5_mismatch_raises_and_leaves_nothing(
    server: ServerState, session: requests.Session, tmp_path: Path
) -> None:
    server.files["/blob.bin"] = BLOB
    url = f"{server.base}/blob.bin"
    with pytest.raises(VerificationError) as info:
        download_file(url, tmp_path / "blob.bin", len(BLOB), "0" * 32, session)
    assert url in str(info.value) and "0" * 32 in str(info.value) and _md5(BLOB) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_size_mismatch_raises_before_download(
    server: ServerState, session: requests.Session, tmp_path: Path
) -> None:
    server.files["/blob.bin"] = BLOB
    with pytest.raises(VerificationError, match=f"server reports {len(BLOB)} bytes, expected 5"):
        download_file(f"{server.base}/blob.bin", tmp_path / "blob.bin", 5, None, session)
    assert list(tmp_path.iterdir()) == []


def test_tqdm_progress_callback(
    server: ServerState, session: requests.Session, tmp_path: Path
) -> None:
    server.files["/blob.bin"] = BLOB
    with TqdmProgress() as bars:
        download_file(
            f"{server.base}/blob.bin",
            tmp_path / "b",
            len(BLOB),
            None,
            session,
            progress=bars.file("b"),
        )
        assert bars._bars["b"].n == len(BLOB)


# safe_extract_zip -----------------------------------------------------------------------------


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return path


@pytest.mark.parametrize(
    "evil", ["../evil.txt", "ok/../../evil.txt", "/tmp/abs-evil.txt", "C:/evil.txt", "..\\evil.txt"]
)
def test_zip_escape_is_refused_and_nothing_written(tmp_path: Path, evil: str) -> None:
    archive = _zip(tmp_path / "a.zip", {"good.txt": b"fine", evil: b"pwned"})
    target = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError) as info:
        safe_extract_zip(archive, target)
    assert repr(evil) in str(info.value)
    assert not target.exists()  # members are checked before any is written
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/abs-evil.txt").exists()


def test_zip_symlink_member_is_refused(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("link")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as archive:
        archive.writestr(link, "../../etc")
    with pytest.raises(UnsafeArchiveError, match="'link' is a symbolic link"):
        safe_extract_zip(tmp_path / "a.zip", tmp_path / "out")


def test_zip_extracts_selected_members(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "a.zip", {"d/": b"", "d/x.txt": b"x", "d/y.txt": b"y"})
    assert safe_extract_zip(archive, tmp_path / "out", ["d/y.txt"]) == [
        tmp_path / "out" / "d" / "y.txt"
    ]
    assert sorted(p.name for p in (tmp_path / "out" / "d").iterdir()) == ["y.txt"]
    assert [p.name for p in safe_extract_zip(archive, tmp_path / "out")] == ["x.txt", "y.txt"]
    with pytest.raises(ValueError, match="'d/nope.txt'"):
        safe_extract_zip(archive, tmp_path / "out", ["d/nope.txt"])


def test_corrupt_zip_names_file(tmp_path: Path) -> None:
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(zipfile.BadZipFile, match="bad.zip"):
        safe_extract_zip(tmp_path / "bad.zip", tmp_path / "out")


# download_coco --------------------------------------------------------------------------------






def test_download_coco_max_images(
    server: ServerState, session: requests.Session, tmp_path: Path
) -> None:
    train = publish_coco(server)
    stages: list[tuple[str, int, int | None, str]] = []
    root = download_coco(
        tmp_path / "coco",
        max_images=3,
        annotations_url=f"{server.base}/annotations/annotations_trainval2017.zip",
        session=session,
        progress=lambda *args: stages.append(args),
        workers=3,
    )

    assert discover_caption_files(root) == {
        "train2017": root / "annotations" / "captions_train2017.json"
    }
    ann = read_caption_annotations(root / "annotations" / "captions_train2017.json")
    assert ann.problems.empty
    assert ann.images["image_id"].tolist() == [3, 7, 19]  # the first three ids, sorted
    assert sorted(ann.captions["image_id"].tolist()) == [3, 3, 7, 7, 19, 19]
    for i, name in zip(ann.images["image_id"], ann.images["file_name"], strict=True):
        assert (root / "train2017" / name).read_bytes() == jpeg_bytes(i)
    assert sorted(p.name for p in (root / "train2017").iterdir()) == [
        f"{i:012d}.jpg" for i in (3, 7, 19)
    ]
    # The original captions file is kept in full; only the needed member was extracted.
    original = json.loads(
        (root / "downloads" / "annotations" / "captions_train2017.json").read_text()
    )
    assert original == train
    assert sorted(p.name for p in (root / "downloads" / "annotations").iterdir()) == [
        "captions_train2017.json"
    ]
    # Images came from each image's coco_url; progress saw the archive and the three images.
    assert sorted(p for p, _ in server.requests if p.startswith("/train2017/")) == [
        f"/train2017/{i:012d}.jpg" for i in (3, 7, 19)
    ]
    assert ("train2017 images", 3, 3, "file") in stages
    assert any(s[0] == "annotations_trainval2017.zip" and s[3] == "B" for s in stages)

    before = len(server.requests)
    download_coco(
        tmp_path / "coco",
        max_images=3,
        annotations_url=f"{server.base}/annotations/annotations_trainval2017.zip",
        session=session,
    )
    assert len(server.requests) == before  # everything was complete: no request at all


def test_download_coco_resumes_and_uses_image_base_url(
    server: ServerState, session: requests.Session, tmp_path: Path
) -> None:
    publish_coco(server)
    for i in (3, 7, 19, 25):
        server.files[f"/mirror/train2017/{i:012d}.jpg"] = jpeg_bytes(i)
    root = tmp_path / "coco"
    (root / "train2017").mkdir(parents=True)
    (root / "train2017" / "000000000003.jpg").write_bytes(jpeg_bytes(3))  # already fetched earlier
    download_coco(
        root,
        max_images=4,
        annotations_url=f"{server.base}/annotations/annotations_trainval2017.zip",
        image_base_url=f"{server.base}/mirror/{{split}}/{{file_name}}",
        session=session,
    )
    image_requests = sorted(p for p, _ in server.requests if "/train2017/" in p)
    assert image_requests == [f"/mirror/train2017/{i:012d}.jpg" for i in (7, 19, 25)]
    assert (
        len(read_caption_annotations(root / "annotations" / "captions_train2017.json").images) == 4
    )


def test_download_coco_failed_image_names_it_and_writes_no_captions(
    server: ServerState, session: requests.Session, tmp_path: Path
) -> None:
    publish_coco(server)
    del server.files["/train2017/000000000007.jpg"]
    with pytest.raises(
        DownloadError,
        match=r"1 of 3 train2017 images failed.*: image 7: http.*/000000000007\.jpg: HTTP 404",
    ):
        download_coco(
            tmp_path,
            max_images=3,
            session=session,
            annotations_url=f"{server.base}/annotations/annotations_trainval2017.zip",
        )
    assert not (tmp_path / "annotations" / "captions_train2017.json").exists()
    assert (tmp_path / "train2017" / "000000000003.jpg").is_file()  # the others are kept


def test_download_coco_unknown_split(
    server: ServerState, session: requests.Session, tmp_path: Path
) -> None:
    publish_coco(server)
    with pytest.raises(
        ValueError, match=r"no annotations/captions_test2017\.json.*captions_val2017"
    ):
        download_coco(
            tmp_path,
            split="test2017",
            max_images=1,
            session=session,
            annotations_url=f"{server.base}/annotations/annotations_trainval2017.zip",
        )


def test_download_coco_full_split_from_zip(
    server: ServerState, session: requests.Session, tmp_path: Path
) -> None:
    train = publish_coco(server)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("train2017/", b"")
        for image in train["images"]:
            archive.writestr(f"train2017/{image['file_name']}", jpeg_bytes(image["id"]))
        archive.writestr("README.txt", b"not part of the layout")
    server.files["/zips/train2017.zip"] = buffer.getvalue()
    kwargs = {
        "annotations_url": f"{server.base}/annotations/annotations_trainval2017.zip",
        "image_zip_url": f"{server.base}/zips/train2017.zip",
        "session": session,
    }

    root = download_coco(tmp_path, **kwargs)
    ann = read_caption_annotations(root / "annotations" / "captions_train2017.json")
    assert len(ann.images) == 5 and len(ann.captions) == 10 and ann.problems.empty
    assert all((root / "train2017" / name).is_file() for name in ann.images["file_name"])
    assert not (root / "README.txt").exists()
    assert not (root / "downloads" / "train2017.zip").exists()  # removed once extracted
    before = len(server.requests)
    download_coco(tmp_path, **kwargs)
    assert len(server.requests) == before
