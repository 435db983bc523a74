"""Part segmentation: label-carrying train transform, the mIoU evaluator, seeded voting and the runner.

Protocol (docs/SEGMENTATION.md): the data set draws ``npoints`` points per shape (ShapeNetPart: seeded,
fixed for the test split); training applies the config's ``augment`` transforms (officially an isotropic
scale U(0.8, 1.25) then a per-axis shift U(-0.1, 0.1)) with the part labels carried along
(:class:`CarryLabels`); one optimizer step per batch (the engine's). Every ``finetune.eval_every`` epochs
:class:`SegEvaluator` scores ``dataset.test``: ``test_miou_c``, ``test_miou_i`` and ``test_acc``
(:mod:`tools.tasks.seg_metrics`). ckpt-best is selected on ``eval.best_metric`` (officially instance mIoU on
the test split: optimistic, labelled so); last-epoch and best-epoch numbers are both reported. Voting
(``--vote`` / ``finetune.vote``) averages the logits of ``finetune.votes`` seeded augmentations of each
test shape and is computed once, with its vote count.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from tools.tasks.common import eval_loader, eval_mode
from tools.tasks.seg_metrics import SegMetricAccumulator, part_table
from utils.errors import ConfigError
from utils.misc import derive_seed

log = logging.getLogger(__name__)

__all__ = ["CarryLabels", "SegEvaluator", "seg_parts_of", "vote_seg_metrics", "build_seg_model",
           "run_segmentation", "SEG_METRICS"]

SEG_METRICS = ("test_miou_i", "test_miou_c", "test_acc")


class CarryLabels:
    """Engine batch transform that moves the batch's per-point ``keys`` (``seg``, ``normals``) with
    the points: ``t(points, generator, extra={key: tensor}) -> (points, extra)``."""

    def __init__(self, transform: Callable, keys: Sequence[str] = ("seg", "normals")):
        self.transform = transform
        self.per_point_keys = tuple(keys)

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None, extra=None):
        return self.transform(points, generator, extra=extra)

    def __repr__(self) -> str:
        return f"CarryLabels({self.transform!r}, keys={self.per_point_keys})"


def seg_parts_of(dataset: Dataset, what: str) -> list[list[int]]:
    """Category index -> part ids of a segmentation data set (its ``seg_classes`` and ``classes``)."""
    seg_classes = getattr(dataset, "seg_classes", None)
    if not seg_classes:
        raise ConfigError(f"{what} ({type(dataset).__name__}) has no part labels (seg_classes); segmentation "
                          f"needs ShapeNetPart or SyntheticShapes")
    return part_table(seg_classes, getattr(dataset, "classes", None))


class SegEvaluator:
    """Engine evaluator: ``{name}_miou_c``, ``{name}_miou_i``, ``{name}_acc`` on ``dataset`` every ``every``
    epochs. The test items are read once and kept on the device (their sampling is deterministic)."""

    def __init__(self, dataset: Dataset, *, num_parts: int, name: str = "test", every: int = 1,
                 batch_size: int = 32, device: torch.device = torch.device("cpu")):
        self.dataset, self.name, self.every, self.batch_size, self.device = dataset, name, every, batch_size, device
        self.parts = seg_parts_of(dataset, f"dataset.{name}")
        self.num_parts = num_parts
        self._batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    def batches(self):
        if self._batches is None:
            self._batches = [(b["points"].to(self.device), b["seg"], b["category"].reshape(-1))
                             for b in eval_loader(self.dataset, self.batch_size)]
        return self._batches

    @torch.no_grad()
    def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]:
        acc = SegMetricAccumulator(self.parts, self.num_parts)
        with eval_mode(model):
            for pts, seg, cat in self.batches():
                acc.update(model.seg_logits(pts, cat.to(self.device)).float().cpu(), seg, cat)
        return acc.compute(self.name)


@torch.no_grad()
def vote_seg_metrics(model: nn.Module, dataset: Dataset, *, votes: int, seed: int, augment: Callable | None,
                     num_parts: int, batch_size: int = 32, device: torch.device = torch.device("cpu"),
                     prefix: str = "vote") -> dict[str, float]:
    """Voting: per shape, the logits of ``votes`` augmented copies of its points, averaged, then the
    metrics. Shape ``i`` draws from a generator seeded by ``(seed, i)``, so the result does not depend on
    the batch size or the order. ``augment`` must keep every point in place (scale, shift, rotate)."""
    if votes < 1:
        raise ConfigError(f"finetune.votes must be >= 1, got {votes}")
    acc = SegMetricAccumulator(seg_parts_of(dataset, "dataset.test"), num_parts)
    index = 0
    with eval_mode(model):
        for batch in eval_loader(dataset, batch_size):
            pts, cat = batch["points"].to(device), batch["category"].reshape(-1)
            B, N, _ = pts.shape
            mean = torch.zeros(B, N, num_parts)
            for b in range(B):
                g = torch.Generator().manual_seed(derive_seed(seed, index + b))
                views = pts[b].expand(votes, N, 3)
                views = augment(views, g) if augment is not None else views
                if views.shape != (votes, N, 3):
                    raise ConfigError(f"voting needs point-wise augmentations (same points, same order); "
                                      f"augment gave {tuple(views.shape)} for {(votes, N, 3)}")
                cats = cat[b].expand(votes).to(device)
                mean[b] = torch.cat([model.seg_logits(v, c).float().cpu() for v, c in
                                     zip(views.split(batch_size), cats.split(batch_size))]).mean(0)
            acc.update(mean, batch["seg"], cat)
            index += B
    return acc.compute(prefix)


def build_seg_model(cfg: Mapping[str, Any], *, ckpt: str | None = None, scratch: bool = False
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """The config's segmentation model, with a pre-trained encoder from ``ckpt`` unless ``scratch``."""
    from models.base import SegmentationModel
    from tools.tasks.finetune import build_finetune_model

    return build_finetune_model(cfg, ckpt=ckpt, scratch=scratch, kind=SegmentationModel, task="segmentation")


def _seg_model(model: nn.Module, cfg: Mapping[str, Any]) -> nn.Module:
    from models.base import SegmentationModel

    if not isinstance(model, SegmentationModel):
        raise ConfigError(f"model.NAME {cfg['model']['NAME']} is not a SegmentationModel (segmentation needs one), "
                          f"it is a {type(model).__name__}")
    return model


def _check_parts(model: nn.Module, dataset: Dataset, what: str) -> None:
    parts = seg_parts_of(dataset, what)
    n_parts = 1 + max(max(p) for p in parts)
    if n_parts > model.num_parts:
        raise ConfigError(f"{what} has part ids up to {n_parts - 1} but model.num_parts is {model.num_parts}")
    n_cat = len(parts)
    if n_cat > getattr(model, "num_categories", n_cat):
        raise ConfigError(f"{what} has {n_cat} categories but model.num_categories is {model.num_categories}")


def run_segmentation(config: str, opts: list[str], *, exp_name: str = "default", run_dir: str | None = None,
                     ckpt: str | None = None, scratch: bool = False, test: str | None = None, vote: bool = False,
                     resume: bool = False, stop_after_epoch: int | None = None) -> dict[str, Any]:
    """Train (or, with ``test``, only evaluate) a part-segmentation model; prints and returns the summary.
    ``stop_after_epoch``: leave after that epoch (checkpoint written), to continue with ``resume``."""
    from tools.engine.builders import build_model_from_cfg, build_split, build_transform
    from tools.engine.trainer import Trainer
    from tools.tasks.finetune import vote_last_and_best
    from tools.tasks.pretrained import load_finetuned
    from tools.engine.runs import prepare_run
    from utils import dist

    if test and run_dir is None:
        run_dir = str(Path("experiments") / Path(config).stem / f"{exp_name}_test")
    def checks(cfg):
        allowed = SEG_METRICS + tuple(k.replace("test", "val") for k in SEG_METRICS)
        if not test and cfg.eval.best_metric not in allowed:
            raise ConfigError(f"eval.best_metric is '{cfg.eval.best_metric}'; segmentation produces "
                              f"{', '.join(allowed)} (val_* with a dataset.val section); set eval.best_metric: test_miou_i")
        if not test and str(cfg.eval.best_metric).startswith("val") and not cfg.dataset.get("val"):
            raise ConfigError(f"eval.best_metric is {cfg.eval.best_metric} but the config has no dataset.val section")

    cfg, device, out = prepare_run(config, opts, exp_name=exp_name, run_dir=run_dir, resume=resume,
                                   kind="test" if test else "segment", task="segment", checks=checks)
    fc = cfg.finetune
    do_vote = bool(vote or fc.vote)
    test_set = build_split(cfg, "test")
    vote_kw = dict(votes=int(fc.votes), seed=int(cfg.seed), augment=build_transform(cfg),
                   batch_size=int(fc.eval_bs), device=device)
    if test:
        torch.manual_seed(int(cfg.seed))
        model = _seg_model(build_model_from_cfg(cfg), cfg)
        meta = load_finetuned(model, test)
        model.to(device)
        _check_parts(model, test_set, "dataset.test")
        ev = SegEvaluator(test_set, num_parts=model.num_parts, batch_size=int(fc.eval_bs), device=device)
        summary: dict[str, Any] = {"mode": "test", "checkpoint": test, "checkpoint_epoch": meta.get("epoch"),
                                   **ev(model, -1)}
        if do_vote:
            summary.update(vote_seg_metrics(model, test_set, num_parts=model.num_parts, **vote_kw))
            summary["votes"] = int(fc.votes)
        _report(summary, out, "summary-test.json")
        return summary

    if resume:
        model, info = _seg_model(build_model_from_cfg(cfg), cfg), {"init": "resumed"}
    else:
        model, info = build_seg_model(cfg, ckpt=ckpt, scratch=scratch)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model %s: %.2fM trainable parameters; init: %s", type(model).__name__, n_params / 1e6, info["init"])
    train_set = build_split(cfg, "train")
    _check_parts(model, train_set, "dataset.train")
    _check_parts(model, test_set, "dataset.test")
    evaluators = [SegEvaluator(test_set, num_parts=model.num_parts, name="test", every=int(fc.eval_every),
                               batch_size=int(fc.eval_bs), device=device)]
    if cfg.dataset.get("val"):
        evaluators.insert(0, SegEvaluator(build_split(cfg, "val"), num_parts=model.num_parts, name="val",
                                          every=int(fc.eval_every), batch_size=int(fc.eval_bs), device=device))
    augment = build_transform(cfg)
    transform = CarryLabels(augment) if augment is not None else None
    trainer = Trainer(cfg, model, train_set, out, evaluators=evaluators, transform=transform, resume=resume,
                      device=device, stop_after_epoch=stop_after_epoch)
    summary = trainer.fit()
    summary.update({"mode": "segment", "init": info["init"], "init_layout": info.get("layout"),
                    "left_at_init": info.get("missing")})
    best = next((r for r in trainer.history if r.get("epoch") == summary.get("best_epoch")), {})
    summary["at_best"] = {k: best.get(k) for k in SEG_METRICS if k in best}
    if do_vote and dist.is_main_process():
        summary["votes"] = int(fc.votes)
        vote_last_and_best(summary, out, model, lambda: _seg_model(build_model_from_cfg(cfg), cfg), device,
                           lambda m: vote_seg_metrics(m, test_set, num_parts=model.num_parts, **vote_kw))
    if dist.is_main_process():
        _report(summary, out, "summary.json")
    dist.cleanup()
    return summary


def _fmt(m: Mapping[str, Any], prefix: str) -> str:
    return (f"class mIoU {m[prefix + '_miou_c']:.2f}, instance mIoU {m[prefix + '_miou_i']:.2f}, "
            f"point accuracy {m[prefix + '_acc']:.2f} %")


def _report(summary: dict[str, Any], out: Path, name: str) -> None:
    lines = [f"run folder: {out}"]
    if summary.get("mode") == "test":
        lines.append(f"checkpoint {summary['checkpoint']} (epoch {summary.get('checkpoint_epoch')})")
        lines.append(f"test (no voting): {_fmt(summary, 'test')}")
        if "vote_miou_i" in summary:
            lines.append(f"test with voting ({summary['votes']} votes, seeded, computed once): {_fmt(summary, 'vote')}")
    else:
        last = summary.get("last") or {}
        if "test_miou_i" in last:
            lines.append(f"test, last epoch ({summary['last_epoch']}): {_fmt(last, 'test')}")
        key = summary.get("best_metric")
        if summary.get("best_value") is not None:
            split = "the test split: optimistic, the official protocol" if key.startswith("test") else "dataset.val"
            at = summary.get("at_best") or {}
            shown = f": {_fmt(at, 'test')}" if "test_miou_i" in at else f" ({key} {summary['best_value']:.2f})"
            lines.append(f"test, best epoch ({summary['best_epoch']}, {key} selected on {split}){shown}")
        if "vote_last" in summary:
            lines.append(f"test with voting ({summary['votes']} votes, seeded), last epoch ({summary['last_epoch']}): "
                         f"{_fmt(summary['vote_last'], 'vote')}")
            lines.append(f"test with voting ({summary['votes']} votes, seeded), best epoch ({summary['best_epoch']}): "
                         f"{_fmt(summary['vote_best'], 'vote')}")
    (out / name).write_text(json.dumps(summary, indent=2, default=str))
    print("\n".join(lines), flush=True)

