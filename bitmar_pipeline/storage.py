"""The feature cache on disk: Parquet shards written atomically, and a DuckDB catalog of views.

Layout under `storage.root`:

    tables/<table>/<partition>.parquet        one file per partition (or "all")
    tables/quarantine/<asset>/<partition>.parquet
    catalog.duckdb                            views over the globs above

Why files-then-views: partition runs may execute in parallel processes. Each writes its own
Parquet file (temp name, fsync, rename), so a reader never sees a half-written shard and a
killed run leaves nothing behind but an ignored temp file. The DuckDB file only holds views
over globs, so it is touched briefly (and retried) when a table first appears, never per row.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bitmar_model.io import TMP_PREFIX, atomic_path

QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("key", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("asset", pa.string()),
        ("partition", pa.string()),
        ("run_id", pa.string()),
    ]
)

# Views the catalog always has, with the schema to show while no file exists yet, so
# `select count(*) from quarantine` answers 0 instead of failing on an empty glob.
CATALOG_VIEWS: dict[str, pa.Schema] = {
    "image_caption_pairs": pa.schema(
        [
            ("image_id", pa.int64()),
            ("caption_id", pa.int64()),
            ("caption", pa.string()),
            ("content_hash", pa.string()),
            ("shard", pa.string()),
        ]
    ),
    "vision_features": pa.schema(
        [
            ("image_id", pa.int64()),
            ("content_hash", pa.string()),
            ("encoder_fingerprint", pa.string()),
            ("shard", pa.string()),
        ]
    ),
    "robot_tasks": pa.schema(
        [
            ("task_id", pa.string()),
            ("task_text", pa.string()),
            ("robots", pa.list_(pa.string())),
            ("source", pa.string()),
            ("split", pa.string()),
        ]
    ),
    "robot_subtasks": pa.schema(
        [("task_id", pa.string()), ("subtask_text", pa.string()), ("robot", pa.string()), ("split", pa.string())]
    ),
    "quarantine": QUARANTINE_SCHEMA,
}


NESTED_VIEWS = frozenset({"quarantine", "vision_features"})


class StorageError(OSError):
    """The storage root cannot be used (missing permission, full disk, ...); names the path."""


def write_parquet_atomic(table: pa.Table | pd.DataFrame, path: Path) -> Path:
    """Write `table` to `path` so that readers see the old file or the complete new one."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Leftovers of a killed writer of this same file: never visible, but not kept either.
        for stale in path.parent.glob(f"{TMP_PREFIX}{path.name}.*"):
            stale.unlink(missing_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            pq.write_table(table, handle, compression="zstd")
    except OSError as exc:
        raise StorageError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def _glob_sql(pattern: Path) -> str:
    return str(pattern).replace("'", "''")


class Storage:
    """Tables, quarantine and catalog under one root directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.catalog_path = self.root / "catalog.duckdb"

    def ensure_writable(self) -> None:
        """Fail early, naming the root, when the storage directory cannot be created or written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f"{TMP_PREFIX}probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise StorageError(exc.errno, f"storage root {self.root} is not writable: {exc.strerror or exc}") from exc

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def table_dir(self, table: str) -> Path:
        return self.root / "tables" / table

    def partition_path(self, table: str, partition: str) -> Path:
        return self.table_dir(table) / f"{partition}.parquet"

    def write_partition(self, table: str, partition: str, data: pa.Table | pd.DataFrame) -> Path:
        """Replace one partition of `table` atomically (re-runs replace, never append)."""
        return write_parquet_atomic(data, self.partition_path(table, partition))

    def partitions(self, table: str) -> list[str]:
        directory = self.table_dir(table)
        if not directory.is_dir():
            return []
        return sorted(p.stem for p in directory.glob("*.parquet") if not p.name.startswith(TMP_PREFIX))

    def has_partition(self, table: str, partition: str) -> bool:
        return self.partition_path(table, partition).is_file()

    def read_partition(self, table: str, partition: str, columns: list[str] | None = None) -> pd.DataFrame:
        path = self.partition_path(table, partition)
        if not path.is_file():
            raise FileNotFoundError(f"table '{table}' has no partition '{partition}' at {path}; materialize it first")
        return pq.read_table(path, columns=columns).to_pandas()

    def read_table(
        self, table: str, columns: list[str] | None = None, partitions: Iterable[str] | None = None
    ) -> pd.DataFrame:
        """All partitions of `table` (or the given ones) as one DataFrame."""
        names = list(partitions) if partitions is not None else self.partitions(table)
        if not names:
            raise FileNotFoundError(f"table '{table}' has no data under {self.table_dir(table)}; materialize it first")
        frames = [pq.read_table(self.partition_path(table, name), columns=columns) for name in names]
        return pa.concat_tables(frames, promote_options="default").to_pandas()

    def write_quarantine(self, asset: str, partition: str, rows: pd.DataFrame, run_id: str) -> Path:
        """Replace the quarantine records of one asset partition (so re-runs do not duplicate them)."""
        frame = pd.DataFrame(
            {
                "source": rows.get("source", pd.Series(dtype=str)).astype(str),
                "key": rows.get("key", pd.Series(dtype=str)).astype(str),
                "reason": rows.get("reason", pd.Series(dtype=str)).astype(str),
                "detail": rows.get("detail", pd.Series(dtype=str)).fillna("").astype(str),
            }
        )
        frame["asset"], frame["partition"], frame["run_id"] = asset, partition, run_id
        table = pa.Table.from_pandas(frame, schema=QUARANTINE_SCHEMA, preserve_index=False)
        return write_parquet_atomic(table, self.table_dir("quarantine") / asset / f"{partition}.parquet")

    def read_quarantine(self, asset: str | None = None) -> pd.DataFrame:
        pattern = f"{asset}/*.parquet" if asset else "*/*.parquet"
        files = sorted(p for p in self.table_dir("quarantine").glob(pattern) if not p.name.startswith(TMP_PREFIX))
        if not files:
            return QUARANTINE_SCHEMA.empty_table().to_pandas()
        return pa.concat_tables([pq.read_table(f) for f in files]).to_pandas()

    def _view_sql(self, view: str) -> str:
        # Quarantine and vision features live one folder deeper (per asset, per encoder).
        relative = "*/*.parquet" if view in NESTED_VIEWS else "*.parquet"
        pattern = self.table_dir(view) / relative
        if any(not p.name.startswith(TMP_PREFIX) for p in self.table_dir(view).glob(relative)):
            # Temp files end in a uuid, not ".parquet", so the glob never matches them.
            return (
                f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM read_parquet('{_glob_sql(pattern)}', "
                "union_by_name = true)"
            )
        schema = CATALOG_VIEWS[view]
        duck_types = {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.list_(pa.string()): "VARCHAR[]"}
        columns = ", ".join(f"CAST(NULL AS {duck_types[f.type]}) AS {f.name}" for f in schema)
        return f"CREATE OR REPLACE VIEW {view} AS SELECT {columns} WHERE false"

    def refresh_catalog(self, views: Iterable[str] | None = None, attempts: int = 50) -> None:
        """(Re)create catalog views. Views are globs, so this is needed only when a table's
        first file appears; the DuckDB write lock is held for milliseconds and retried when a
        parallel run holds it."""
        names = list(views) if views is not None else list(CATALOG_VIEWS)
        statements = [self._view_sql(v) for v in names]
        self.root.mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):
            try:
                with duckdb.connect(str(self.catalog_path)) as con:
                    for statement in statements:
                        con.execute(statement)
                return
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or attempt == attempts - 1:
                    raise StorageError(0, f"cannot update catalog {self.catalog_path}: {exc}") from exc
                time.sleep(0.05 * (attempt + 1))

    def query(self, sql: str) -> pd.DataFrame:
        """Run a read-only query against the catalog (retrying while a writer holds the lock)."""
        for attempt in range(50):
            try:
                with duckdb.connect(str(self.catalog_path), read_only=True) as con:
                    return con.execute(sql).df()
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or attempt == 49:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")
