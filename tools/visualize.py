"""Pictures of a pre-training run: GC heat-maps over training, reconstructions, curves.

    python tools/visualize.py gc     --run RUN_DIR [--max-ckpts 5] [--shapes 0 40] [-o gc.png]
    python tools/visualize.py gc     --ckpts a.pth b.pth [--split train] [--shapes 3]
    python tools/visualize.py recon  --ckpt RUN_DIR/ckpt-last.pth [--shapes 0 40] [-o recon.png]
    python tools/visualize.py curves --run RUN_DIR  (or --metrics RUN_DIR/metrics.jsonl) [-o curves.png]

``gc``: each shape's points coloured by the EMA teacher's GC score of the patch they belong to
(nearest patch centre), one column pair per checkpoint (GC heat-map | the GM3D mask chosen at that
epoch with a fixed seed: visible vs masked patches, the N_sel patches picked by score marked with
``x``), one row per shape, one colour bar shared by every panel. GM3D checkpoints only.

``recon``: input cloud | visible patches | the student's reconstruction of the masked patches (predicted
points in red, their patch centres in black, the visible patches in grey), any pre-training
checkpoint (Point-MAE or GM3D; GM3D uses its own masker with the teacher's scores at the checkpoint's
epoch).

``curves``: loss terms, N_sel, GC rank correlation, learning rate and linear-SVM accuracy against
epoch, from a run's ``metrics.jsonl``; only the panels whose metric is present.

Every panel of one figure uses the same camera (``--elev``/``--azim``) and the same axis limits; the
figure's pixel size is fixed by ``--panel`` (inches) and ``--dpi`` (see the ``*_figsize`` functions).
Models are built from the checkpoint's own ``config["model"]`` and loaded with the exact key check;
a GM3D knowledge teacher whose ``teacher_ckpt`` file is missing is left out (the model is built as
variant A and the ``knowledge_teacher.*`` keys are skipped): the GC decoder and the EMA teacher do not
depend on it.

:class:`GCPanelEvaluator` is the periodic training hook (``vis.gc_every``): an engine evaluator that
saves the ``gc`` figure of fixed shapes as ``gc_epoch_XXX.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import matplotlib

matplotlib.use("Agg")  # headless; the figures below use the object API (no pyplot state)

import argparse
import copy
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from mpl_toolkits.mplot3d import Axes3D  # noqa: F401  (registers the 3d projection)

from tools import checkpoint as ckpt_io
from utils.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger("tools.visualize")

__all__ = [
    "GCPanelEvaluator",
    "LoadedCheckpoint",
    "NoGCDecoderError",
    "curve_panels",
    "curves_figsize",
    "gc_colors",
    "gc_figsize",
    "gc_state",
    "load_checkpoint",
    "load_shapes",
    "main",
    "normalize_scores",
    "patch_of_point",
    "read_metrics",
    "recon_figsize",
    "recon_state",
    "render_curves",
    "render_gc",
    "render_recon",
    "run_checkpoints",
]

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
CURVE_W, CURVE_H = 3.6, 2.7   # inches per `curves` sub-plot


class NoGCDecoderError(CheckpointError):
    """The checkpoint's model has no GC decoder / EMA teacher (a plain Point-MAE checkpoint)."""


def _is_gm3d(model: torch.nn.Module) -> bool:
    return hasattr(model, "teacher_scores") and hasattr(model, "MAE_decoder_loss_pred") \
        and hasattr(model.masker, "num_selected")


# ---------------------------------------------------------------------------------------------------
# Checkpoints and data
# ---------------------------------------------------------------------------------------------------
@dataclass
class LoadedCheckpoint:
    """A pre-training checkpoint rebuilt for inference (``model`` is in eval mode)."""

    path: Path
    model: torch.nn.Module
    epoch: int
    config: dict
    model_name: str
    is_gm3d: bool
    variant: str | None = None           # the GM3D loss variant the run trained with
    kd_dropped: bool = False             # the knowledge teacher was left out (its file is missing)
    point_head: torch.nn.Module | None = None  # variant B: the knowledge teacher's head (from the file)


def _model_class(name: str):
    from models import MODELS

    try:
        return MODELS.get(name)
    except Exception as e:  # unknown name: the registry's message lists the known ones
        raise ConfigError(f"config model.NAME {name!r}: {e}") from e


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Build the model of a pre-training checkpoint from its own ``config['model']`` and load it.

    The key check is exact; the only keys allowed to be left over are ``knowledge_teacher.*`` when the
    GM3D knowledge teacher's ``teacher_ckpt`` file is missing (the model is then built as variant A,
    which has no knowledge teacher; the GC decoder and the EMA teacher do not depend on it).
    """
    from models import build_model
    from models.gm3d import PointMAEGM3D

    path = Path(path)
    ck = ckpt_io.load_file(path)
    config = ck.get("config")
    if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping) \
            or not config["model"].get("NAME"):
        raise CheckpointError(f"{path} carries no 'config' with a model section; tools/visualize.py needs "
                              f"a checkpoint written by this project's trainer (ckpt-*.pth of a run)")
    config = copy.deepcopy(dict(config))
    model_cfg = copy.deepcopy(dict(config["model"]))
    cls = _model_class(model_cfg["NAME"])
    is_gm3d = isinstance(cls, type) and issubclass(cls, PointMAEGM3D)
    variant, kd_dropped = None, False
    if is_gm3d:
        g = dict(model_cfg.get("gm3d") or {})
        variant = g.get("variant", "C")
        teacher = g.get("teacher_ckpt")
        if variant in ("B", "C") and not teacher:
            variant = "A"  # the trainer built it as variant A too (with a warning)
        if variant in ("B", "C") and not Path(teacher).is_file():
            log.warning("%s: knowledge-teacher checkpoint %s not found; building the model without it "
                        "(variant A) for visualisation; the GC decoder and EMA teacher do not need it",
                        path, teacher)
            g["variant"], g["teacher_ckpt"] = "A", None
            model_cfg["gm3d"] = g
            kd_dropped = True
    model = build_model(model_cfg, where=f"{path}: config.model")
    state = ckpt_io.extract_state_dict(ck, path)
    ckpt_io.load_state_dict_checked(model, state,
                                    allowed_unexpected_prefixes=("knowledge_teacher.",) if kd_dropped else (),
                                    what=f"checkpoint {path}")
    point_head = None
    if variant == "B":
        # Variant B trains no student point head; its reconstructions come from the knowledge
        # teacher's head applied to the student's decoded tokens (the weights are in the file).
        w = state.get("knowledge_teacher.increase_dim.0.weight")
        b = state.get("knowledge_teacher.increase_dim.0.bias")
        if w is not None and b is not None:
            point_head = torch.nn.Conv1d(w.shape[1], w.shape[0], 1)
            point_head.load_state_dict({"weight": w, "bias": b})
            point_head = point_head.to(device).eval()
    if is_gm3d:
        model.masker.set_total_epochs(int(config.get("max_epoch", 1)))
    model = model.to(device).eval()
    return LoadedCheckpoint(path=path, model=model, epoch=int(ck.get("epoch", 0)), config=config,
                            model_name=str(ck.get("model_name") or type(model).__name__), is_gm3d=is_gm3d,
                            variant=variant, kd_dropped=kd_dropped, point_head=point_head)


_EPOCH_FILE = re.compile(r"ckpt-epoch-(\d+)\.pth$")


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """Every ``ckpt-epoch-*.pth`` and ``ckpt-last.pth`` of a run, ordered by epoch, one per epoch."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder not found: {run_dir}")
    by_epoch: dict[int, Path] = {}
    for p in sorted(run_dir.glob("ckpt-epoch-*.pth")):
        m = _EPOCH_FILE.search(p.name)
        if m:
            by_epoch.setdefault(int(m.group(1)), p)
    last = run_dir / "ckpt-last.pth"
    if last.is_file():
        epoch = int(ckpt_io.load_file(last).get("epoch", -1))
        by_epoch.setdefault(epoch, last)
    if not by_epoch:
        raise CheckpointError(f"{run_dir} holds no ckpt-epoch-*.pth or ckpt-last.pth")
    return [by_epoch[e] for e in sorted(by_epoch)]


def thin(items: Sequence, k: int | None) -> list:
    """At most ``k`` items, evenly spaced, always keeping the first and the last."""
    items = list(items)
    if not k or k >= len(items):
        return items
    if k == 1:
        return [items[-1]]
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]


@dataclass
class Shape:
    points: torch.Tensor   # (N, 3)
    class_name: str
    name: str
    index: int


def default_split(config: Mapping[str, Any]) -> str:
    ds = config.get("dataset") or {}
    return "svm_test" if ds.get("svm_test") else "train"


def _shape_from_item(dataset, item: Mapping[str, Any], index: int) -> Shape:
    label = int(item["label"]) if "label" in item else -1
    classes = getattr(dataset, "classes", None)
    if classes is not None and 0 <= label < len(classes):
        cls = str(classes[label])
    elif label >= 0:
        cls = f"class {label}"
    else:
        cls = str(item.get("name", f"shape {index}"))
    pts = item["points"]
    pts = torch.as_tensor(pts, dtype=torch.float32)[:, :3]
    return Shape(points=pts, class_name=cls, name=str(item.get("name", f"#{index}")), index=index)


def shapes_from_dataset(dataset, indices: Sequence[int], seed: int = 0) -> list[Shape]:
    """Items ``indices`` of ``dataset``. Data sets that seed their draws per item (all of this project's,
    at their epoch 0) give the same points whatever ``seed``; one that draws from the global torch or
    numpy RNG draws under ``seed``, without touching the caller's RNG state."""
    n = len(dataset)
    out = []
    for i in indices:
        if not -n <= i < n:
            raise DataError(f"shape index {i} is out of range: the data set has {n} items ({dataset!r})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np_state = np.random.get_state()
            np.random.seed(seed)
            try:
                item = dataset[i % n]
            finally:
                np.random.set_state(np_state)
        out.append(_shape_from_item(dataset, item, i % n))
    return out


def load_shapes(config: Mapping[str, Any], indices: Sequence[int], split: str | None = None,
                seed: int = 0) -> list[Shape]:
    """Shapes ``indices`` of a split of the checkpoint's data config (default: svm_test, else train)."""
    from tools.builders import build_split

    split = split or default_split(config)
    dataset = build_split(config, split)
    return shapes_from_dataset(dataset, indices, seed)


# ---------------------------------------------------------------------------------------------------
# Pure pieces: scores -> colours, points -> patches
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


def patch_of_point(points: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """(N, 3), (G, 3) -> (N,) index of the nearest patch centre of every point."""
    return torch.cdist(points.float(), center.float()).argmin(dim=1)


# ---------------------------------------------------------------------------------------------------
# Model pieces (inference)
# ---------------------------------------------------------------------------------------------------
def _mask_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


@torch.no_grad()
def gc_state(model: torch.nn.Module, points: torch.Tensor, epoch: int, seed: int = 0) -> dict[str, Any]:
    """The EMA teacher's GC scores and the GM3D mask of one cloud at ``epoch``.

    Returns numpy arrays: ``points`` (N, 3), ``center`` (G, 3), ``scores`` (G,), ``mask`` (G,) bool
    (True = masked), ``selected`` (G,) bool (the N_sel top-scored patches, always masked),
    ``point_patch`` (N,), and ints ``n_sel``, ``n_masked``.
    """
    if not _is_gm3d(model):
        raise NoGCDecoderError(f"{type(model).__name__} has no GC decoder")
    device = next(model.parameters()).device
    pts = points.to(device=device, dtype=torch.float32)[None]
    p = model.group(pts)
    scores = model.teacher_scores(p.neighborhood, p.center)                       # (1, G)
    masker = model.masker
    if epoch < 0:  # before training (the engine's epoch -1): no curriculum yet, a random mask
        from models.masking import GM3DMask
        masker = GM3DMask(masker.ratio, alpha_max=0.0)
    epoch = max(epoch, 0)
    mask = masker(p.center, generator=_mask_generator(seed), epoch=epoch, scores=scores)
    G = p.center.shape[1]
    n_sel = int(masker.num_selected(epoch, G))
    selected = torch.zeros(G, dtype=torch.bool)
    if n_sel > 0:
        selected[scores[0].topk(n_sel).indices.cpu()] = True
    return {"points": pts[0].cpu().numpy(), "center": p.center[0].cpu().numpy(),
            "scores": scores[0].cpu().numpy(), "mask": mask[0].cpu().numpy(), "selected": selected.numpy(),
            "point_patch": patch_of_point(pts[0], p.center[0]).cpu().numpy(), "n_sel": n_sel,
            "n_masked": int(mask[0].sum())}


@torch.no_grad()
def recon_state(ck: LoadedCheckpoint, points: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """Mask one cloud as the checkpoint's training did at its epoch and reconstruct the masked patches.

    Returns numpy arrays: ``points`` (N, 3), ``center`` (G, 3), ``mask`` (G,), ``visible`` (V*K, 3)
    visible patch points, ``pred`` (M, K, 3) and ``target`` (M, K, 3) masked patches in cloud
    coordinates, ``pred_center`` (M, 3), and ``chamfer`` (the mean CD-l2 of the masked patches).
    """
    from extensions import chamfer_l2

    model, epoch = ck.model, max(ck.epoch, 0)
    device = next(model.parameters()).device
    pts = points.to(device=device, dtype=torch.float32)[None]
    p = model.group(pts)
    scores = None
    if ck.is_gm3d and model.masker.num_selected(epoch, p.center.shape[1]) > 0:
        scores = model.teacher_scores(p.neighborhood, p.center)
    mask = model.masker(p.center, generator=_mask_generator(seed), epoch=epoch, scores=scores)
    M = int(mask[0].sum())
    x_vis = model.MAE_encoder(p.neighborhood, p.center, mask)
    dec = model.decode(x_vis, p.center, mask, model.mask_token, model.MAE_decoder)[:, -M:]
    if ck.point_head is not None:
        K = model.group_size
        pred = ck.point_head(dec.transpose(1, 2)).transpose(1, 2).reshape(1, M, K, 3)
    else:
        pred = model.reconstruct(dec)                                             # (1, M, K, 3)
    K = pred.shape[2]
    c_m = p.center[mask].view(1, M, 1, 3)
    target = p.neighborhood[mask].view(1, M, K, 3)
    cd = chamfer_l2(pred.reshape(M, K, 3).float(), target.reshape(M, K, 3).float(), reduction="none").mean()
    vis = (p.neighborhood + p.center[:, :, None])[~mask]                          # (V, K, 3)
    return {"points": pts[0].cpu().numpy(), "center": p.center[0].cpu().numpy(),
            "mask": mask[0].cpu().numpy(),
            "visible": vis.reshape(-1, 3).cpu().numpy(), "pred": (pred + c_m)[0].cpu().numpy(),
            "target": (target + c_m)[0].cpu().numpy(), "pred_center": c_m[0, :, 0].cpu().numpy(),
            "chamfer": float(cd)}


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
    l, b, w, h = ax.get_position().bounds
    ax.figure.text(l + w / 2, b + h + 0.04 / ax.figure.get_figheight(), text, ha="center", va="bottom",
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
    return _save(fig, out, dpi)


def _save(fig: Figure, out: str | Path, dpi: int) -> Path:
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
    return _save(fig, out, dpi)


# ---------------------------------------------------------------------------------------------------
# curves
# ---------------------------------------------------------------------------------------------------
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
    return _save(fig, out, dpi)


# ---------------------------------------------------------------------------------------------------
# Periodic hook
# ---------------------------------------------------------------------------------------------------
class GCPanelEvaluator:
    """Engine evaluator: every ``every`` epochs save the ``gc`` figure of fixed shapes.

    The shapes are the first ``num_shapes`` items of ``dataset``; the figure goes to
    ``out_dir/gc_epoch_XXX.png`` (``gc_epoch_init.png`` for the evaluation before training). Returns
    ``{}`` (no metrics). With a model that has no GC decoder (plain Point-MAE) it logs one warning and
    does nothing.
    """

    name = "gc_vis"

    def __init__(self, dataset, *, every: int, out_dir: str | Path, num_shapes: int = 2, seed: int = 0,
                 panel: float = 2.2, dpi: int = 100, norm: str = "panel"):
        self.dataset, self.every, self.out_dir = dataset, int(every), Path(out_dir)
        self.num_shapes = max(1, min(int(num_shapes), len(dataset)))
        self.seed, self.panel, self.dpi, self.norm = seed, panel, dpi, norm
        self._shapes: list[Shape] | None = None
        self._warned = False

    def shapes(self) -> list[Shape]:
        if self._shapes is None:
            self._shapes = shapes_from_dataset(self.dataset, range(self.num_shapes), self.seed)
        return self._shapes

    def path_for(self, epoch: int) -> Path:
        return self.out_dir / ("gc_epoch_init.png" if epoch < 0 else f"gc_epoch_{epoch:03d}.png")

    def __call__(self, model: torch.nn.Module, epoch: int) -> dict[str, float]:
        model = model.module if hasattr(model, "module") else model
        if not _is_gm3d(model):
            if not self._warned:
                log.warning("gc_vis: %s has no GC decoder (not a GM3D model); the GC panel is skipped",
                            type(model).__name__)
                self._warned = True
            return {}
        was_training = model.training
        model.eval()
        try:
            states = [[gc_state(model, s.points, epoch, self.seed)] for s in self.shapes()]
        finally:
            model.train(was_training)
        out = render_gc(states, self.shapes(), [epoch], self.path_for(epoch), norm=self.norm,
                        panel=self.panel,
                        dpi=self.dpi, title=f"GM3D teacher GC scores, epoch {epoch}")
        log.info("gc_vis: wrote %s", out)
        return {}


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def _run_label(run_dir: Path) -> str:
    """``<config stem>/<run name>`` for titles."""
    run_dir = Path(run_dir).resolve()
    return f"{run_dir.parent.name}/{run_dir.name}" if run_dir.parent.name else run_dir.name


def _view_from_args(args) -> View:
    return View(elev=args.elev, azim=args.azim, up=args.up, zoom=args.zoom, point_size=args.point_size)


def cmd_gc(args) -> Path:
    if args.run:
        paths = thin(run_checkpoints(args.run), args.max_ckpts)
    else:
        paths = thin([Path(p) for p in args.ckpts], args.max_ckpts)
    cks = []
    for p in paths:
        ck = load_checkpoint(p, args.device)
        if not ck.is_gm3d:
            raise NoGCDecoderError(
                f"{p}: this checkpoint ({ck.model_name}, model.NAME={ck.config['model']['NAME']}) has no GC "
                f"decoder; the gc view needs a Point-MAE + GeoMask3D checkpoint "
                f"(model.NAME: Point_MAE_GM3D). "
                f"Use `recon` or `curves` for plain Point-MAE runs.")
        cks.append(ck)
    cks.sort(key=lambda c: c.epoch)
    shapes = load_shapes(cks[-1].config, args.shapes, args.split, args.seed)
    states = [[gc_state(ck.model, s.points, ck.epoch, args.seed) for ck in cks] for s in shapes]
    out = Path(args.out or (Path(args.run) / "vis" / "gc.png" if args.run else "gc.png"))
    title = args.title or (f"GM3D teacher GC score per patch and the mask it drives "
                           f"({_run_label(cks[-1].path.parent)}, variant {cks[-1].variant})")
    return render_gc(states, shapes, [ck.epoch for ck in cks], out, norm=args.norm, panel=args.panel,
                     dpi=args.dpi, view=_view_from_args(args), title=title)


def cmd_recon(args) -> Path:
    ck = load_checkpoint(args.ckpt, args.device)
    shapes = load_shapes(ck.config, args.shapes, args.split, args.seed)
    states = [recon_state(ck, s.points, args.seed) for s in shapes]
    out = Path(args.out or Path(args.ckpt).parent / "vis" / "recon.png")
    kind = f"GM3D variant {ck.variant}" if ck.is_gm3d else "Point-MAE"
    title = args.title or (f"{kind} reconstruction: {_run_label(ck.path.parent)}/{ck.path.name}, "
                           f"epoch {ck.epoch}")
    return render_recon(states, shapes, ck.epoch, out, panel=args.panel, dpi=args.dpi,
                        view=_view_from_args(args), title=title)


def cmd_curves(args) -> Path:
    src = Path(args.metrics or args.run)
    records = read_metrics(src)
    run_dir = src if src.is_dir() else src.parent
    out = Path(args.out or run_dir / "vis" / "curves.png")
    title = args.title or f"Training curves: {_run_label(run_dir)}"
    return render_curves(records, out, dpi=args.dpi, title=title)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, panel: float):
        sp.add_argument("-o", "--out", default=None, help="output PNG (default: <run>/vis/<command>.png)")
        sp.add_argument("--dpi", type=int, default=100, help="pixels per inch of the PNG")
        sp.add_argument("--title", default=None, help="figure title")
        if panel:
            sp.add_argument("--shapes", type=int, nargs="+", default=[0], help="item indices of the split")
            sp.add_argument("--split", default=None,
                            help="data-set split of the checkpoint's config (default svm_test, else train)")
            sp.add_argument("--seed", type=int, default=0,
                            help="seed of the mask (and of the point subset of a data set that draws from the global RNG)")
            sp.add_argument("--panel", type=float, default=panel, help="inches per 3-D panel")
            sp.add_argument("--elev", type=float, default=18.0, help="camera elevation (degrees)")
            sp.add_argument("--azim", type=float, default=-55.0, help="camera azimuth (degrees)")
            sp.add_argument("--up", choices=("x", "y", "z"), default="y", help="data axis drawn upwards")
            sp.add_argument("--zoom", type=float, default=1.2, help="3-D box zoom")
            sp.add_argument("--point-size", type=float, default=None, help="marker area (default: auto)")
            sp.add_argument("--device", default="cpu", help="torch device for the forward passes")

    g = sub.add_parser("gc", help="GC heat-map per epoch + the GM3D mask (GM3D checkpoints)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpts", nargs="+", help="checkpoint files (ordered by their epoch)")
    src.add_argument("--run", help="run folder: every ckpt-epoch-*.pth and ckpt-last.pth")
    g.add_argument("--max-ckpts", type=int, default=None, help="keep at most this many, evenly spaced")
    g.add_argument("--norm", choices=("panel", "rank", "global"), default="panel",
                   help="colour scale: min-max per panel (default), rank per panel, or raw scores shared")
    common(g, 2.4)

    r = sub.add_parser("recon", help="input / visible patches / reconstruction of the masked patches")
    r.add_argument("--ckpt", required=True, help="pre-training checkpoint (Point-MAE or GM3D)")
    common(r, 2.6)

    c = sub.add_parser("curves", help="training curves from metrics.jsonl")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder holding metrics.jsonl")
    src.add_argument("--metrics", help="a metrics.jsonl file")
    common(c, 0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_grad_enabled(False)
    try:
        out = {"gc": cmd_gc, "recon": cmd_recon, "curves": cmd_curves}[args.command](args)
    except (CheckpointError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_grad_enabled(True)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
