"""Markdown tables: the one renderer behind the model card and the Dagster metadata panels."""

from __future__ import annotations

from typing import Any

import pandas as pd


def _text(value: Any, max_chars: int | None) -> str:
    text = str(value)
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    # A literal pipe would end the cell.
    return text.replace("|", "\\|")


def markdown_table(frame: pd.DataFrame, max_rows: int | None = None, max_chars: int | None = None) -> str:
    """`frame` as a GitHub-flavoured Markdown table: its first `max_rows` rows (all by default),
    cells cut to `max_chars` characters with an ellipsis (uncut by default)."""
    shown = frame if max_rows is None else frame.head(max_rows)
    header = "| " + " | ".join(map(str, shown.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in shown.columns) + " |"
    body = ["| " + " | ".join(_text(v, max_chars) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join([header, rule, *body])
