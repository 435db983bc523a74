"""The periodic training hook (``vis.gc_every``): the ``gc`` figure of fixed shapes every few epochs."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tools.vis.forward import gc_state
from tools.vis.loading import Shape, is_gm3d, shapes_from_dataset
from tools.vis.panels import render_gc

log = logging.getLogger(__name__)

__all__ = ["GCPanelEvaluator"]


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

