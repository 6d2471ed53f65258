import os
import subprocess
import sys
import textwrap

import duckdb
import pandas as pd
import pytest

from bitmar_pipeline.storage import Storage, StorageError, write_parquet_atomic


def test_partition_round_trip_and_catalog(tmp_path):
    storage = Storage(tmp_path / "root")
    storage.refresh_catalog()
    # Views exist before any data, and answer zero rather than failing on an empty glob.
    assert storage.query("select count(*) as n from quarantine")["n"][0] == 0
    assert storage.query("select count(*) as n from vision_features")["n"][0] == 0
    frame = pd.DataFrame(
        {
            "image_id": [1, 2],
            "caption_id": [10, 20],
            "caption": ["a", "b"],
            "content_hash": ["h1", "h2"],
            "shard": ["s", "s"],
        }
    )
    storage.write_partition("image_caption_pairs", "s", frame)
    storage.write_quarantine(
        "image_caption_pairs",
        "s",
        pd.DataFrame({"source": ["f"], "key": ["caption:3"], "reason": ["empty_caption"], "detail": [""]}),
        "run1",
    )
    storage.refresh_catalog()
    with duckdb.connect(str(storage.catalog_path), read_only=True) as con:
        assert con.execute("select count(*) from image_caption_pairs").fetchone()[0] == 2
        assert con.execute("select reason, asset, run_id from quarantine").fetchall() == [
            ("empty_caption", "image_caption_pairs", "run1")
        ]
    # Re-running a partition replaces its quarantine rows instead of appending.
    storage.write_quarantine(
        "image_caption_pairs", "s", pd.DataFrame({"source": [], "key": [], "reason": [], "detail": []}), "run2"
    )
    assert storage.query("select count(*) as n from quarantine")["n"][0] == 0
    pd.testing.assert_frame_equal(storage.read_partition("image_caption_pairs", "s"), frame)


def test_killed_writer_leaves_no_partial_file(tmp_path):
    target = tmp_path / "t" / "shard.parquet"
    script = textwrap.dedent(
        f"""
        import os, pyarrow as pa, pyarrow.parquet as pq
        from bitmar_pipeline import storage
        original = pq.write_table
        def write_then_die(table, where, **kw):
            original(table, where, **kw)
            os._exit(9)  # killed after the bytes are written, before the rename
        pq.write_table = write_then_die
        storage.write_parquet_atomic(pa.table({{"x": list(range(1000))}}), {str(target)!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == 9
    assert not target.exists()
    assert Storage(tmp_path).partitions("t") == []  # the temp file is never listed as a shard


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_root_names_the_path(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(StorageError, match="locked"):
        Storage(locked / "root").ensure_writable()


def test_unwritable_root_is_a_clear_error_even_as_root(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match=str(blocker)):
        Storage(blocker / "root").ensure_writable()
    with pytest.raises(StorageError, match="cannot write"):
        write_parquet_atomic(pd.DataFrame({"x": [1]}), blocker / "t.parquet")
    assert blocker.read_text() == "not a directory"


def test_full_disk_leaves_no_shard(tmp_path, monkeypatch):
    import errno

    import pyarrow.parquet as pq

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", no_space)
    target = tmp_path / "t" / "s.parquet"
    with pytest.raises(StorageError, match="No space left"):
        write_parquet_atomic(pd.DataFrame({"x": [1]}), target)
    assert list((tmp_path / "t").iterdir()) == []
