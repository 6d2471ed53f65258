"""Shared helpers that turn results into metadata a person reads in the Dagster UI.

One helper per kind: `table_preview` for every table shown in a metadata panel (Dagster's own
table widget), `table_metadata` for the catalog's standard keys of a stored table
(`dagster/row_count`, `dagster/column_schema`, `dagster/uri`, `dagster/table_name`),
`image_metadata` for figures, `url_metadata` for links.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bitmar_pipeline.storage import Storage

ROW_COUNT = "dagster/row_count"
PARTITION_ROW_COUNT = "dagster/partition_row_count"
COLUMN_SCHEMA = "dagster/column_schema"
URI = "dagster/uri"
TABLE_NAME = "dagster/table_name"


def _column_type(dtype: Any) -> str:
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_integer_dtype(dtype):
        return "int"
    if pd.api.types.is_float_dtype(dtype):
        return "float"
    return "string"


def _cell(value: Any, max_chars: int | None) -> str | int | float | bool | None:
    """A value Dagster's TableRecord takes: bool, int, float, str or None; sequences joined, long text cut."""
    if value is None:
        return None
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return None if math.isnan(value) else float(value)
    if isinstance(value, list | tuple | np.ndarray):
        value = ", ".join(map(str, value))
    text = str(value)
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return text


def table_preview(frame: pd.DataFrame, max_rows: int | None = 8, max_chars: int | None = 80) -> dg.TableMetadataValue:
    """The first `max_rows` rows of `frame` (all with None) as Dagster's table widget, cells cut to `max_chars`."""
    shown = frame if max_rows is None else frame.head(max_rows)
    columns = [str(c) for c in shown.columns]
    schema = dg.TableSchema(
        columns=[dg.TableColumn(name, _column_type(dtype)) for name, dtype in zip(columns, shown.dtypes, strict=True)]
    )
    records = [
        dg.TableRecord(dict(zip(columns, (_cell(v, max_chars) for v in row), strict=True)))
        for row in shown.itertuples(index=False, name=None)
    ]
    return dg.MetadataValue.table(records, schema)


def column_schema(schema: pa.Schema) -> dg.TableSchema:
    """A Parquet (Arrow) schema as the catalog's Columns tab shows it."""
    return dg.TableSchema(
        columns=[
            dg.TableColumn(field.name, str(field.type), constraints=dg.TableColumnConstraints(nullable=field.nullable))
            for field in schema
        ]
    )


def table_metadata(
    storage: Storage, view: str, files: Sequence[Path], written: Path | None = None
) -> dict[str, dg.MetadataValue]:
    """The catalog's standard keys of a stored table: rows over all its Parquet `files`, the
    columns of the file just `written` (the first file otherwise), its URI and DuckDB view name.
    For a partitioned asset `written` is the partition's file: its rows go to partition_row_count."""
    files = sorted({Path(f) for f in files} | ({Path(written)} if written else set()))
    metadata: dict[str, dg.MetadataValue] = {
        ROW_COUNT: dg.MetadataValue.int(sum(pq.ParquetFile(f).metadata.num_rows for f in files)),
        TABLE_NAME: dg.MetadataValue.text(f"{storage.catalog_path.stem}.main.{view}"),
    }
    source = written or (files[0] if files else None)
    if source is not None:
        metadata[COLUMN_SCHEMA] = dg.MetadataValue.table_schema(column_schema(pq.read_schema(source)))
        metadata[URI] = dg.MetadataValue.text(Path(source).resolve().as_uri())
    if written is not None:
        metadata[PARTITION_ROW_COUNT] = dg.MetadataValue.int(pq.ParquetFile(written).metadata.num_rows)
    return metadata


def url_metadata(name: str, url: str | None) -> dict[str, dg.MetadataValue]:
    """A clickable link, or nothing when there is no URL."""
    return {name: dg.MetadataValue.url(url)} if url else {}


def quarantine_metadata(quarantine: pd.DataFrame) -> dict[str, dg.MetadataValue]:
    counts = (
        quarantine["reason"].value_counts().rename_axis("reason").reset_index(name="rows")
        if len(quarantine)
        else pd.DataFrame({"reason": pd.Series(dtype=str), "rows": pd.Series(dtype=int)})
    )
    return {
        "quarantined_rows": dg.MetadataValue.int(len(quarantine)),
        "quarantined_by_reason": table_preview(counts, max_rows=50),
    }


def image_metadata(path: Path) -> dict[str, dg.MetadataValue]:
    """A figure as a clickable path plus an inline image in the asset's metadata panel."""
    encoded = base64.b64encode(Path(path).read_bytes()).decode()
    return {
        f"{Path(path).stem}_png": dg.MetadataValue.path(str(path)),
        f"{Path(path).stem}_figure": dg.MetadataValue.md(f"![{Path(path).stem}](data:image/png;base64,{encoded})"),
    }
