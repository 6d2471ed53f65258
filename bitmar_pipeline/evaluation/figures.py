"""PNG figures for evaluation reports and Dagster metadata.

Figures are drawn on `matplotlib.figure.Figure` with an explicit Agg canvas instead of
pyplot: no global figure state and no GUI backend, so assets can draw in parallel
threads and on headless machines. Each function writes one PNG (dpi 100) atomically
(temporary name, then rename) and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bitmar_model.io import atomic_path
from bitmar_model.metrics import expected_calibration_error, label_matrix, reliability_bins
from bitmar_model.robots import ROBOT_CLASSES

DPI = 100
_MAX_TICK_LABELS = 60  # beyond this, tick labels overlap into an unreadable band


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_path: str | Path) -> Path:
    path = Path(out_path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


def _heatmap(
    fig: Figure, matrix: np.ndarray, x_labels: Sequence[str], y_labels: Sequence[str]
) -> Axes:
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax)
    if len(x_labels) <= _MAX_TICK_LABELS:
        ax.set_xticks(
            range(len(x_labels)), labels=list(x_labels), rotation=45, ha="right", fontsize=8
        )
    if len(y_labels) <= _MAX_TICK_LABELS:
        ax.set_yticks(range(len(y_labels)), labels=list(y_labels), fontsize=8)
    return ax


def confusion_figure(
    pred: np.ndarray,
    gold: np.ndarray | Sequence[Sequence[str]],
    out_path: str | Path,
    title: str = "Robot selection: gold vs predicted",
) -> Path:
    """Multi-label co-occurrence matrix: cell (g, p) counts tasks with robot g in the gold
    set and robot p in the predicted set; the diagonal holds per-robot true positives."""
    pred_m, gold_m = label_matrix(np.asarray(pred)), label_matrix(gold)
    counts = gold_m.astype(np.int64).T @ pred_m.astype(np.int64)
    fig = _new_figure(6.5, 5.5)
    ax = _heatmap(fig, counts, ROBOT_CLASSES, ROBOT_CLASSES)
    for (g, p), value in np.ndenumerate(counts):
        ax.text(
            p,
            g,
            str(value),
            ha="center",
            va="center",
            color="white" if value < counts.max() / 2 else "black",
        )
    ax.set_xlabel("predicted robot")
    ax.set_ylabel("gold robot")
    ax.set_title(title)
    return _save(fig, out_path)


def reliability_diagram(
    confidences: np.ndarray,
    correct: np.ndarray,
    out_path: str | Path,
    n_bins: int = 10,
    title: str = "Reliability diagram",
) -> Path:
    """Accuracy per equal-width confidence bin against the diagonal of perfect calibration."""
    bins = reliability_bins(confidences, correct, n_bins)
    ece = expected_calibration_error(confidences, correct, n_bins)
    fig = _new_figure(5, 5)
    ax = fig.add_subplot()
    ax.bar(
        [b.bin_low for b in bins],
        [b.accuracy for b in bins],
        width=1.0 / n_bins,
        align="edge",
        edgecolor="black",
        label="accuracy",
    )
    ax.plot(
        [b.mean_conf for b in bins],
        [b.accuracy for b in bins],
        "o",
        color="tab:orange",
        label="mean confidence",
    )
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} (ECE {ece:.3f}, n={sum(b.count for b in bins)})")
    ax.legend(loc="upper left")
    return _save(fig, out_path)


def memory_usage_heatmap(
    usage: np.ndarray, out_path: str | Path, title: str = "Episodic memory slot usage"
) -> Path:
    """Heatmap of memory slot usage: rows are steps ([steps, K]) or one row ([K] or [1, K])."""
    usage = np.atleast_2d(np.asarray(usage, dtype=np.float64))
    if usage.ndim != 2:
        raise ValueError(f"usage must be [K] or [steps, K], got shape {usage.shape}")
    fig = _new_figure(8, max(2.0, min(6.0, 1.0 + 0.3 * len(usage))))
    ax = fig.add_subplot()
    image = ax.imshow(usage, cmap="magma", aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="usage")
    ax.set_xlabel("memory slot")
    ax.set_ylabel("step" if len(usage) > 1 else "")
    if len(usage) == 1:
        ax.set_yticks([])
    ax.set_title(title)
    return _save(fig, out_path)


def attention_map_figure(
    matrix: np.ndarray,
    x_labels: Sequence[str],
    y_labels: Sequence[str],
    title: str,
    out_path: str | Path,
) -> Path:
    """Attention weights [len(y_labels), len(x_labels)]: rows attend (queries), columns are attended (keys)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (len(y_labels), len(x_labels)):
        raise ValueError(
            f"matrix {matrix.shape} does not match labels ({len(y_labels)}, {len(x_labels)})"
        )
    fig = _new_figure(
        max(4.0, min(12.0, 0.35 * len(x_labels) + 2)),
        max(3.0, min(10.0, 0.35 * len(y_labels) + 1.5)),
    )
    ax = _heatmap(fig, matrix, x_labels, y_labels)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title)
    return _save(fig, out_path)


def weight_distribution_figure(
    fractions: Mapping[str, tuple[float, float, float]],
    out_path: str | Path,
    title: str = "Ternary weight distribution",
) -> Path:
    """Stacked horizontal bars per layer: fractions of weights quantised to 0, +1 and -1."""
    if not fractions:
        raise ValueError("no layers to plot")
    names = list(fractions)
    values = np.array([fractions[n] for n in names], dtype=np.float64)
    fig = _new_figure(7, max(2.5, 0.3 * len(names) + 1.5))
    ax = fig.add_subplot()
    left = np.zeros(len(names))
    for column, (label, color) in enumerate(
        (("0", "lightgray"), ("+1", "tab:blue"), ("-1", "tab:red"))
    ):
        ax.barh(names, values[:, column], left=left, color=color, label=label)
        left += values[:, column]
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of weights")
    ax.invert_yaxis()  # first layer on top, as listed
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(
        loc="upper center", bbox_to_anchor=(0.5, -0.15), ncols=3
    )  # below the axes: bars fill it
    ax.set_title(title)
    return _save(fig, out_path)


def curve_figure(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    title: str,
    out_path: str | Path,
    x_label: str = "step",
    y_label: str = "value",
) -> Path:
    """Line plot of named (step, value) series, e.g. training and validation loss."""
    if not curves:
        raise ValueError("no curves to plot")
    fig = _new_figure(7, 4)
    ax = fig.add_subplot()
    for name, points in curves.items():
        steps, values = zip(*points, strict=True) if points else ((), ())
        ax.plot(steps, values, marker="." if len(points) < 50 else None, label=name)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return _save(fig, out_path)
