"""The periodic training hooks: the ``gc`` figure of fixed shapes (``vis.gc_every``) and the GC-score
diagnostics of a fixed probe batch (``vis.probe_every``), every few epochs."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tools.vis.forward import gc_state
from tools.vis.loading import Shape, is_gm3d, shapes_from_dataset

log = logging.getLogger(__name__)

__all__ = ["GCPanelEvaluator", "ProbeEvaluator"]


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
        from tools.vis.panels import render_gc    # matplotlib: imported only when a figure is drawn

        model = model.module if hasattr(model, "module") else model
        if not is_gm3d(model):
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



class ProbeEvaluator:
    """Engine evaluator (``vis.probe_every``): the content-blindness diagnostics of
    :func:`tools.vis.diagnostics.diagnose` on a fixed probe batch, as per-epoch metrics.

    The batch is ``num_shapes`` items of ``dataset`` spread evenly over it (every class), drawn once.
    Returns ``probe/shuffle_rho``, ``probe/rotation_rho``, ``probe/position_rotation_rho``,
    ``probe/position_r2``, ``probe/target_rho``, ``probe/target_rho_heldout``,
    ``probe/position_baseline_rho``, ``probe/position_linear_rho``, ``probe/bn_var_ratio`` (median
    teacher / student running-variance ratio) and ``probe/bn_var_ratio_worst``. A statistic that does
    not apply (the content shuffle of a multi-scale model) is left out with one logged note; a model
    without a GC decoder gets one warning and ``{}``.
    """

    name = "gc_probe"
    KEYS = ("shuffle_rho", "rotation_rho", "position_rotation_rho", "position_r2", "target_rho",
            "target_rho_heldout", "position_baseline_rho", "position_linear_rho")

    def __init__(self, dataset, *, every: int, num_shapes: int = 16):
        self.dataset, self.every, self.num_shapes = dataset, int(every), max(1, int(num_shapes))
        self._points: torch.Tensor | None = None
        self._warned: set[str] = set()

    def points(self) -> torch.Tensor:
        if self._points is None:
            from tools.vis.diagnostics import Probe

            self._points = Probe.from_dataset(self.dataset, self.num_shapes).points
        return self._points

    def _note(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            log.warning(msg, *args)
            self._warned.add(key)

    def __call__(self, model: torch.nn.Module, epoch: int) -> dict[str, float]:
        from tools.vis.diagnostics import diagnose

        model = model.module if hasattr(model, "module") else model
        if not is_gm3d(model):
            self._note("model", "gc_probe: %s has no GC decoder (not a GM3D model); the diagnostics are "
                                "skipped", type(model).__name__)
            return {}
        d = diagnose(model, self.points())
        for key, why in d["skipped"].items():
            self._note(key, "gc_probe: probe/%s is not logged: %s", key, why)
        out = {f"probe/{k}": float(d[k]) for k in self.KEYS if k in d and k not in d["skipped"]}
        if "bn" in d and d["bn"]["layers"]:
            out["probe/bn_var_ratio"] = float(d["bn"]["median_ratio"])
            out["probe/bn_var_ratio_worst"] = float(d["bn"]["worst_ratio"])
        return out
