"""The ``gc`` and ``recon`` figures: per-point colours from GC scores, 3-D panels, PNG output.

Every panel of one figure uses the same camera (:class:`View`: ``elev``/``azim``) and the same axis
limits; the figure's pixel size is fixed by the panel size (inches) and the dpi (see the ``*_figsize``
functions). The figures use matplotlib's object API (no pyplot state) and the headless Agg backend.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless; the figures below use the object API (no pyplot state)

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from mpl_toolkits.mplot3d import Axes3D  # noqa: F401  (registers the 3d projection)

from tools.vis.loading import Shape

__all__ = ["GC_CMAP", "View", "gc_colors", "gc_figsize", "normalize_scores", "recon_figsize", "render_gc",
           "render_recon", "save_png"]

# ---------------------------------------------------------------------------------------------------
# Look
# ---------------------------------------------------------------------------------------------------
GC_CMAP = "plasma"
VISIBLE_COLOR = "#3b75af"     # visible patches
MASKED_COLOR = "#ef8636"      # masked patches
INPUT_COLOR = "#555555"
CONTEXT_COLOR = "#c8c8c8"     # visible patches behind a reconstruction
PRED_COLOR = "#d62728"        # predicted points of the masked patches
CENTER_COLOR = "#000000"

TITLE_STRIP = 0.40            # inches above each 3-D panel for its title
TOP = 0.40                    # inches for the figure title
PAIR_GAP = 0.10               # inches between two epochs' column pairs in `gc`
CBAR_W = 1.00                 # inches for the colour bar column in `gc`


# ---------------------------------------------------------------------------------------------------
# Scores -> colours
# ---------------------------------------------------------------------------------------------------
def normalize_scores(scores, mode: str = "panel", vmin: float | None = None,
                     vmax: float | None = None) -> np.ndarray:
    """Map GC scores to [0, 1], monotone (non-decreasing) in the score.

    ``panel``: min-max over the given scores (the top-scored patch gets 1, the lowest 0; the ranking
    loss only fixes the order, not the scale, so this is the default). ``rank``: the rank in
    [0, 1] (ties share the mean rank). ``global``: ``(s - vmin) / (vmax - vmin)`` clipped, with
    ``vmin``/``vmax`` given (a raw scale shared across panels).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        return s
    if mode == "panel":
        lo, hi = float(s.min()), float(s.max())
    elif mode == "global":
        if vmin is None or vmax is None:
            raise ValueError("normalize_scores(mode='global') needs vmin and vmax")
        lo, hi = float(vmin), float(vmax)
    elif mode == "rank":
        if s.size == 1:
            return np.ones(1)
        order = s.argsort(kind="stable")
        ranks = np.empty(s.size)
        ranks[order] = np.arange(s.size, dtype=np.float64)
        for v in np.unique(s):  # ties: mean rank
            sel = s == v
            if sel.sum() > 1:
                ranks[sel] = ranks[sel].mean()
        return ranks / (s.size - 1)
    else:
        raise ValueError(f"unknown score normalisation {mode!r}; expected 'panel', 'rank' or 'global'")
    if not hi > lo:
        return np.full(s.shape, 0.5)
    return np.clip((s - lo) / (hi - lo), 0.0, 1.0)


def gc_colors(scores, point_patch, *, mode: str = "panel", vmin: float | None = None,
              vmax: float | None = None, cmap: str = GC_CMAP) -> tuple[np.ndarray, np.ndarray]:
    """Per-point RGBA colours from per-patch GC scores.

    Args:
        scores: (G,) the patch scores.
        point_patch: (N,) the patch index of every point.
        mode, vmin, vmax: see :func:`normalize_scores`.
        cmap: matplotlib colormap name.

    Returns:
        (rgba (N, 4), value (N,) in [0, 1]); a point of the top-scored patch gets ``cmap(1.0)``.
    """
    patch_value = normalize_scores(scores, mode, vmin, vmax)
    idx = np.asarray(point_patch, dtype=np.int64).reshape(-1)
    value = patch_value[idx]
    return colormaps[cmap](value), value


# ---------------------------------------------------------------------------------------------------
# 3-D panels
# ---------------------------------------------------------------------------------------------------
@dataclass
class View:
    """One camera and one cube of axis limits for every panel of a figure."""

    elev: float = 18.0
    azim: float = -55.0
    up: str = "y"             # the data axis drawn vertically
    zoom: float = 1.2
    point_size: float | None = None
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)   # plot coordinates
    half: float = 1.0         # every axis spans center +- half (a cube)

    def fit(self, clouds: Sequence[np.ndarray], margin: float = 1.03) -> View:
        """A copy whose cube holds every cloud (the union's bounding box, equal sides)."""
        pts = np.concatenate([np.stack(self.xyz(c), 1) for c in clouds if np.asarray(c).size])
        lo, hi = pts.min(0), pts.max(0)
        v = copy.copy(self)
        v.center = tuple(float(x) for x in (lo + hi) / 2)
        v.half = float(max((hi - lo).max() / 2, 1e-6) * margin)
        return v

    def xyz(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Data -> plot coordinates (a cyclic permutation, so handedness is kept, ``up`` drawn as z)."""
        pts = np.asarray(pts).reshape(-1, 3)
        order = {"z": (0, 1, 2), "y": (2, 0, 1), "x": (1, 2, 0)}[self.up]
        return pts[:, order[0]], pts[:, order[1]], pts[:, order[2]]


def _auto_point_size(n_points: int, panel: float) -> float:
    # about constant ink per panel: ~9 pt^2 at 512 points in a 2.4-inch panel
    return float(np.clip(9.0 * (512 / max(n_points, 1)) * (panel / 2.4) ** 2, 0.6, 25.0))


def _axes3d(fig: Figure, rect: Sequence[float], view: View):
    ax = fig.add_axes(rect, projection="3d")
    ax.view_init(elev=view.elev, azim=view.azim)
    (cx, cy, cz), r = view.center, view.half
    ax.set_xlim(cx - r, cx + r)
    ax.set_ylim(cy - r, cy + r)
    ax.set_zlim(cz - r, cz + r)
    ax.set_box_aspect((1, 1, 1), zoom=view.zoom)
    ax.set_axis_off()
    ax.patch.set_alpha(0.0)
    ax.computed_zorder = False  # draw in call order: centres / markers stay on top of their points
    return ax


def _scatter(ax, view: View, pts: np.ndarray, color, size: float, **kw) -> None:
    x, y, z = view.xyz(pts)
    kw.setdefault("linewidths", 0)
    ax.scatter(x, y, z, c=color, s=size, depthshade=False, **kw)


def _panel_title(ax, text: str, fontsize: float = 8.5) -> None:
    """The title in the strip above the panel (placed by figure coordinates: a 3-D axes' own title
    sits inside its box, over the points)."""
    left, b, w, h = ax.get_position().bounds
    ax.figure.text(left + w / 2, b + h + 0.04 / ax.figure.get_figheight(), text, ha="center", va="bottom",
                   fontsize=fontsize, linespacing=1.25)


def _cell_rects(fig_w: float, fig_h: float, n_rows: int, n_cols: int, panel: float, *,
                left: float = 0.0, top: float = TOP, col_gap_every: int = 0,
                gap: float = 0.0) -> list[list[list[float]]]:
    """Figure-fraction rects [l, b, w, h] of an n_rows x n_cols grid of square panels, each with a
    title strip above; ``gap`` inches after every ``col_gap_every`` columns."""
    rects = []
    for i in range(n_rows):
        row = []
        y_top = fig_h - top - i * (panel + TITLE_STRIP) - TITLE_STRIP
        for j in range(n_cols):
            x = left + j * panel + (j // col_gap_every) * gap if col_gap_every else left + j * panel
            row.append([x / fig_w, (y_top - panel) / fig_h, panel / fig_w, panel / fig_h])
        rects.append(row)
    return rects


# ---------------------------------------------------------------------------------------------------
# gc figure
# ---------------------------------------------------------------------------------------------------
def gc_figsize(n_shapes: int, n_ckpts: int, panel: float) -> tuple[float, float]:
    """Inches of the ``gc`` figure: a (GC, mask) column pair per checkpoint, a row per shape."""
    width = n_ckpts * 2 * panel + max(n_ckpts - 1, 0) * PAIR_GAP + CBAR_W
    height = TOP + n_shapes * (panel + TITLE_STRIP)
    return width, height


def render_gc(states: Sequence[Sequence[dict]], shapes: Sequence[Shape], epochs: Sequence[int],
              out: str | Path, *,
              norm: str = "panel", panel: float = 2.4, dpi: int = 100, view: View | None = None,
              title: str | None = None, cmap: str = GC_CMAP) -> Path:
    """Draw ``states[row=shape][col=checkpoint]`` (from :func:`gc_state`) and save a PNG."""
    n_rows, n_cols = len(shapes), len(epochs)
    view = (view or View()).fit([st["points"] for row in states for st in row])
    w, h = gc_figsize(n_rows, n_cols, panel)
    fig = Figure(figsize=(w, h), dpi=dpi)
    rects = _cell_rects(w, h, n_rows, 2 * n_cols, panel, col_gap_every=2, gap=PAIR_GAP)
    all_scores = np.concatenate([st["scores"] for row in states for st in row])
    vmin, vmax = float(all_scores.min()), float(all_scores.max())
    for i, (shape, row) in enumerate(zip(shapes, states)):
        for j, (epoch, st) in enumerate(zip(epochs, row)):
            size = view.point_size or _auto_point_size(len(st["points"]), panel)
            rgba, _ = gc_colors(st["scores"], st["point_patch"], mode=norm, vmin=vmin, vmax=vmax, cmap=cmap)
            ax = _axes3d(fig, rects[i][2 * j], view)
            _scatter(ax, view, st["points"], rgba, size)
            ep = "init" if epoch < 0 else f"epoch {epoch}"
            _panel_title(ax, f"{shape.class_name} · {ep}\nteacher GC score")
            ax = _axes3d(fig, rects[i][2 * j + 1], view)
            masked = st["mask"][st["point_patch"]]
            colors = np.where(masked[:, None], np.array(matplotlib.colors.to_rgba(MASKED_COLOR)),
                              np.array(matplotlib.colors.to_rgba(VISIBLE_COLOR)))
            _scatter(ax, view, st["points"], colors, size)
            if st["n_sel"] > 0:
                _scatter(ax, view, st["center"][st["selected"]], CENTER_COLOR, 3.0 * size + 10, marker="x",
                         linewidths=1.3)
            _panel_title(ax, f"{shape.class_name} · {ep}\n"
                             f"mask: {st['n_masked']} masked, {st['n_sel']} by GC")
    # colour bar + legend in the right column
    x0 = w - CBAR_W + 0.18
    cb_h = max(h - TOP - TITLE_STRIP - 1.1, 0.4)
    cax = fig.add_axes([x0 / w, (TITLE_STRIP * 0.5 + 0.9) / h, 0.16 / w, cb_h / h])
    if norm == "global":
        sm, label = ScalarMappable(Normalize(vmin, vmax), colormaps[cmap]), "teacher GC score"
    else:
        sm = ScalarMappable(Normalize(0.0, 1.0), colormaps[cmap])
        label = "GC score, min-max per panel" if norm == "panel" else "GC score rank per panel"
    cb = fig.colorbar(sm, cax=cax)
    cb.set_label(label, fontsize=8)
    cb.ax.tick_params(labelsize=7)
    handles = [Line2D([], [], ls="", marker="o", color=VISIBLE_COLOR, label="visible"),
               Line2D([], [], ls="", marker="o", color=MASKED_COLOR, label="masked"),
               Line2D([], [], ls="", marker="x", color=CENTER_COLOR, label="top-GC\n(N_sel)")]
    fig.legend(handles=handles, loc="lower left", bbox_to_anchor=((w - CBAR_W + 0.02) / w, 0.02 / h),
               fontsize=7, frameon=False, handletextpad=0.2, borderaxespad=0.1)
    fig.suptitle(title or "GM3D: EMA teacher's GC score per patch and the mask it drives", fontsize=10,
                 y=1 - 0.08 / h, va="top")
    return save_png(fig, out, dpi)


def save_png(fig: Figure, out: str | Path, dpi: int) -> Path:
    """Write ``fig`` as a PNG at ``dpi`` (creating the folder) and return the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    return out


# ---------------------------------------------------------------------------------------------------
# recon figure
# ---------------------------------------------------------------------------------------------------
def recon_figsize(n_shapes: int, panel: float) -> tuple[float, float]:
    """Inches of the ``recon`` figure: three panels per shape row."""
    return 3 * panel, TOP + n_shapes * (panel + TITLE_STRIP)


def render_recon(states: Sequence[dict], shapes: Sequence[Shape], epoch: int, out: str | Path, *,
                 panel: float = 2.6, dpi: int = 100, view: View | None = None,
                 title: str | None = None) -> Path:
    # one box holding the inputs and every predicted point (nothing is drawn outside its panel)
    view = (view or View()).fit([np.concatenate([st["points"], st["pred"].reshape(-1, 3)]) for st in states])
    w, h = recon_figsize(len(shapes), panel)
    fig = Figure(figsize=(w, h), dpi=dpi)
    rects = _cell_rects(w, h, len(shapes), 3, panel)
    for i, (shape, st) in enumerate(zip(shapes, states)):
        size = view.point_size or _auto_point_size(len(st["points"]), panel)
        G, M = len(st["mask"]), int(st["mask"].sum())
        ax = _axes3d(fig, rects[i][0], view)
        _scatter(ax, view, st["points"], INPUT_COLOR, size)
        _panel_title(ax, f"{shape.class_name} · input\n{len(st['points'])} points")
        ax = _axes3d(fig, rects[i][1], view)
        _scatter(ax, view, st["visible"], VISIBLE_COLOR, size)
        _panel_title(ax, f"{shape.class_name} · visible\n{G - M} of {G} patches")
        ax = _axes3d(fig, rects[i][2], view)
        _scatter(ax, view, st["visible"], CONTEXT_COLOR, size)
        _scatter(ax, view, st["pred"].reshape(-1, 3), PRED_COLOR, 0.7 * size)
        _scatter(ax, view, st["pred_center"], CENTER_COLOR, 2.0 * size + 6)
        _panel_title(ax, f"{shape.class_name} · epoch {epoch}: {M} masked\n"
                         f"reconstructed (CD-l2 {st['chamfer']:.4f})")
    fig.suptitle(title or f"Masked reconstruction, epoch {epoch}", fontsize=10, y=1 - 0.08 / h, va="top")
    return save_png(fig, out, dpi)


