"""Training curves of a run: loss terms, N_sel, GC rank correlation, learning rate and linear-SVM
accuracy against epoch, from its ``metrics.jsonl``; only the panels whose metric is present."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from tools.vis.panels import TOP, save_png
from utils.errors import DataError

__all__ = ["curve_panels", "curves_figsize", "read_metrics", "render_curves"]

CURVE_W, CURVE_H = 3.6, 2.7   # inches per `curves` sub-plot


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a run folder is accepted too)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"metrics file not found: {path}")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not a JSON line ({e})") from e
    return records


# (title, y label, metric keys, log-scale candidate)
_CURVE_SPECS: list[tuple[str, str, tuple[str, ...], bool]] = [
    ("total loss", "loss", ("train/loss",), True),
    ("point loss (Chamfer)", "loss", ("train/loss_point", "train/chamfer_l2", "train/chamfer_l1"), True),
    ("feature KD loss", "loss", ("train/loss_feat",), True),
    ("GC ranking loss", "loss", ("train/loss_gc",), False),
    ("N_sel (GC-selected masked patches)", "patches", ("train/n_sel",), False),
    ("GC rank correlation (teacher vs error)", "Spearman rho", ("train/gc_rank_corr",), False),
    ("learning rate", "lr", ("lr",), False),
    ("linear SVM accuracy", "accuracy (%)", ("svm_acc",), False),
]


def curve_panels(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, list, bool]]:
    """The sub-plots that have data: (title, y label, [(key, epochs, values)], log scale)."""
    panels = []
    for title, ylabel, keys, log_ok in _CURVE_SPECS:
        series = []
        for key in keys:
            pts = [(r["epoch"], r[key]) for r in records
                   if isinstance(r.get("epoch"), (int, float)) and r["epoch"] >= 0
                   and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if pts:
                series.append((key, [p[0] for p in pts], [p[1] for p in pts]))
        if keys == ("svm_acc",):  # the randomly initialised encoder, logged at epoch -1
            init = [r["init/svm_acc"] for r in records if isinstance(r.get("init/svm_acc"), (int, float))]
            if init:
                series.append(("init/svm_acc", [-1], [init[0]]))
        if series:
            vals = [v for _, _, ys in series for v in ys]
            use_log = log_ok and min(vals) > 0 and max(vals) / min(vals) > 10
            panels.append((title, ylabel, series, use_log))
    return panels


def curves_figsize(n_panels: int) -> tuple[float, float]:
    cols = min(3, max(n_panels, 1))
    rows = max(math.ceil(n_panels / cols), 1)
    return cols * CURVE_W, rows * CURVE_H + TOP


def render_curves(records: Sequence[Mapping[str, Any]], out: str | Path, *, dpi: int = 100,
                  title: str | None = None) -> Path:
    panels = curve_panels(records)
    if not panels:
        raise DataError("the metrics file has none of the plotted metrics "
                        f"({', '.join(k for _, _, ks, _ in _CURVE_SPECS for k in ks)})")
    w, h = curves_figsize(len(panels))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(w, h), dpi=dpi)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.5 / h + 0.02, top=1 - (TOP + 0.3) / h,
                        wspace=0.32, hspace=0.62)
    for n, (ptitle, ylabel, series, use_log) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, n + 1)
        for key, xs, ys in series:
            if key.startswith("init/"):
                ax.plot(xs, ys, ls="", marker="*", ms=9, color="#7f7f7f", label="random init")
            else:
                ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, ms=3, lw=1.4,
                        label=key.split("/", 1)[-1])
        if use_log:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(ptitle, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7, frameon=False)
    fig.suptitle(title or "Training curves", fontsize=10, y=1 - 0.08 / h, va="top")
    return save_png(fig, out, dpi)


