"""Shared helpers that turn results into metadata a person reads in the Dagster UI."""

from __future__ import annotations

import base64
from pathlib import Path

import dagster as dg
import pandas as pd

from bitmar_pipeline.markdown import markdown_table as render_markdown_table


def markdown_table(frame: pd.DataFrame, max_rows: int = 8, max_chars: int = 80) -> dg.MarkdownMetadataValue:
    """A preview of `frame` for the metadata panel: a few rows, long cells cut."""
    if frame.head(max_rows).empty:
        return dg.MetadataValue.md("_(no rows)_")
    return dg.MetadataValue.md(render_markdown_table(frame, max_rows=max_rows, max_chars=max_chars))


def quarantine_metadata(quarantine: pd.DataFrame) -> dict[str, dg.MetadataValue]:
    counts = (
        quarantine["reason"].value_counts().rename_axis("reason").reset_index(name="rows")
        if len(quarantine)
        else pd.DataFrame(columns=["reason", "rows"])
    )
    return {
        "quarantined_rows": dg.MetadataValue.int(len(quarantine)),
        "quarantined_by_reason": markdown_table(counts, max_rows=50),
    }


def image_metadata(path: Path) -> dict[str, dg.MetadataValue]:
    """A figure as a clickable path plus an inline image in the asset's metadata panel."""
    encoded = base64.b64encode(Path(path).read_bytes()).decode()
    return {
        f"{Path(path).stem}_png": dg.MetadataValue.path(str(path)),
        f"{Path(path).stem}_figure": dg.MetadataValue.md(f"![{Path(path).stem}](data:image/png;base64,{encoded})"),
    }
