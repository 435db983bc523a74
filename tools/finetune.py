"""Fine-tuning classification: train sampling, the accuracy evaluator, seeded voting, and the runner.

Protocol (docs/METHOD.md, sections 6.2 and 6.3), with the reporting changes of its section 6.5:

* Training sampling (:class:`TrainSampling`): FPS of every cloud to ``point_all`` points, then one random
  subset of ``npoints`` of those indices shared by the batch (the official RS-CNN trick), then the
  config's ``augment`` transforms (scale-and-translate). ``point_all`` defaults to
  ``ceil(npoints * 75 / 64)`` (1024 -> 1200, 2048 -> 2400, 4096 -> 4800, the official table), capped at
  the cloud size (so ScanObjectNN at 2048 points and ModelNet 8k use a random permutation).
* Test (:class:`AccuracyEvaluator`): deterministic FPS to ``npoints`` (start index 0), overall accuracy
  and mean class accuracy, every ``finetune.eval_every`` epochs on ``dataset.test``.
* Voting (:func:`vote_logits`): ``finetune.votes`` seeded test-time augmentations per shape (random
  ``npoints`` subset of its FPS ``point_all`` pool, then the ``augment`` transforms), logits averaged.
  Each shape's draws come from its own generator seeded by ``(seed, shape index)``, so the result does
  not depend on the batch size, the device or the order. ``finetune.vote_repeats: N`` repeats the whole
  vote N times, repeat ``r`` seeded by ``seed + r`` (:func:`vote_repeats`); the summary keeps every
  repeat, their mean and sample std (the headline) and their max (the official statistic, labelled).
* Every run reports the last-epoch and the best-epoch test accuracy with their epochs; the best epoch is
  selected on the test split (the official protocol, optimistic) and is labelled so.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from extensions import fps, gather
from tools.stats import format_accuracy, mean_std
from utils.errors import ConfigError, DataError
from utils.io import atomic_write
from utils.misc import derive_seed

log = logging.getLogger(__name__)

__all__ = ["check_best_metric", "default_point_all", "fps_to", "TrainSampling", "AccuracyEvaluator", "predict_logits",
           "vote_logits", "vote_repeats", "repeat_stats", "accuracy_metrics", "run_finetune",
           "build_finetune_model"]


# ---------------------------------------------------------------------------------------- sampling
def default_point_all(npoints: int, point_all: int | None = None) -> int:
    """The FPS pool size before the random ``npoints`` subset (official map, generalised)."""
    if point_all is not None:
        if point_all < npoints:
            raise ConfigError(f"finetune.point_all ({point_all}) must be >= npoints ({npoints})")
        return int(point_all)
    return int(math.ceil(npoints * 75 / 64))


def fps_to(points: torch.Tensor, npoints: int) -> torch.Tensor:
    """Deterministic FPS of (B, N, 3) to (B, npoints, 3), in FPS order; a no-op when N == npoints (the
    FPS would only reorder, and grouping is FPS from index 0 again, which keeps the same first point)."""
    n = points.shape[1]
    if n < npoints:
        raise DataError(f"clouds have {n} points, fewer than npoints={npoints}")
    if n == npoints:
        return points
    return gather(points, fps(points, npoints))


class TrainSampling:
    """Official fine-tune train sampling + augmentation, as an engine batch transform.

    ``t(points (B, N, 3), generator) -> (B, npoints, 3)``: FPS to ``min(point_all, N)``, one random
    ``npoints`` subset of that pool for the whole batch (``randperm`` from ``generator``), then
    ``augment(points, generator)``.
    """

    def __init__(self, npoints: int, point_all: int | None = None, augment: Callable | None = None):
        self.npoints = int(npoints)
        self.point_all = default_point_all(self.npoints, point_all)
        self.augment = augment

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n = points.shape[1]
        if n < self.npoints:
            raise DataError(f"training clouds have {n} points, fewer than npoints={self.npoints}")
        pool = min(self.point_all, n)
        if pool < n:
            points = gather(points, fps(points, pool))
        dev = generator.device if generator is not None else torch.device("cpu")
        keep = torch.randperm(pool, generator=generator, device=dev)[: self.npoints].to(points.device)
        points = points[:, keep]
        return self.augment(points, generator) if self.augment is not None else points

    def __repr__(self) -> str:
        return f"TrainSampling(npoints={self.npoints}, point_all={self.point_all}, augment={self.augment!r})"


# ---------------------------------------------------------------------------------------- evaluation
def _loader(dataset: Dataset, batch_size: int) -> DataLoader:
    from tools.engine import _collate_points

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=_collate_points)


def _eval_mode(model: nn.Module):
    class _Ctx:
        def __enter__(self):
            self.was = model.training
            model.eval()

        def __exit__(self, *exc):
            model.train(self.was)

    return _Ctx()


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: Dataset, npoints: int, *, batch_size: int = 64,
                   device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain test logits: deterministic FPS to ``npoints``; returns (logits (M, C), labels (M,)) on CPU."""
    logits, labels = [], []
    with _eval_mode(model):
        for batch in _loader(dataset, batch_size):
            pts = fps_to(batch["points"].to(device), npoints)
            logits.append(model.logits(pts).float().cpu())
            labels.append(batch["label"].reshape(-1))
    return torch.cat(logits), torch.cat(labels)


@torch.no_grad()
def vote_logits(model: nn.Module, dataset: Dataset, npoints: int, *, votes: int = 10, seed: int = 0,
                point_all: int | None = None, augment: Callable | None = None, batch_size: int = 64,
                device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor]:
    """Voting logits: per shape, ``votes`` random ``npoints`` subsets of its FPS pool, each augmented,
    logits averaged. Shape ``i`` draws from a generator seeded by ``(seed, i)`` (CPU), so the result is
    a function of (model, data, seed, votes) only. Returns (logits (M, C), labels (M,)) on CPU."""
    if votes < 1:
        raise ConfigError(f"finetune.votes must be >= 1, got {votes}")
    pool_size = default_point_all(npoints, point_all)
    logits, labels = [], []
    index = 0
    with _eval_mode(model):
        for batch in _loader(dataset, batch_size):
            pts = batch["points"].to(device)
            B, N, _ = pts.shape
            if N < npoints:
                raise DataError(f"test clouds have {N} points, fewer than npoints={npoints}")
            pool = min(pool_size, N)
            if pool < N:
                pts = gather(pts, fps(pts, pool))
            views = []
            for b in range(B):
                g = torch.Generator().manual_seed(derive_seed(seed, index + b))
                idx = torch.stack([torch.randperm(pool, generator=g)[:npoints] for _ in range(votes)])
                v = pts[b][idx.to(device)]                                   # (votes, npoints, 3)
                views.append(augment(v, g) if augment is not None else v)
            views = torch.stack(views)                                       # (B, votes, npoints, 3)
            out = torch.cat([model.logits(chunk).float() for chunk in
                             views.reshape(B * votes, npoints, 3).split(batch_size)])
            logits.append(out.view(B, votes, -1).mean(1).cpu())
            labels.append(batch["label"].reshape(-1))
            index += B
    return torch.cat(logits), torch.cat(labels)


def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor, prefix: str = "test") -> dict[str, float]:
    """Overall accuracy and mean class accuracy, in percent."""
    pred = logits.argmax(-1)
    correct = (pred == labels).float()
    classes = labels.unique()
    per_class = torch.stack([correct[labels == c].mean() for c in classes])
    return {f"{prefix}_acc": float(correct.mean() * 100), f"{prefix}_macc": float(per_class.mean() * 100)}


class AccuracyEvaluator:
    """Engine evaluator: plain (FPS) accuracy on ``dataset`` every ``every`` epochs -> ``{name}_acc``,
    ``{name}_macc``. The FPS-sampled test clouds are computed once and kept on the device (they are
    deterministic), so later evaluations only run the model."""

    def __init__(self, dataset: Dataset, npoints: int, *, name: str = "test", every: int = 1,
                 batch_size: int = 64, device: torch.device = torch.device("cpu")):
        self.dataset, self.npoints, self.name, self.every = dataset, npoints, name, every
        self.batch_size, self.device = batch_size, device
        self._batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @torch.no_grad()
    def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]:
        if self._batches is None:
            self._batches = [(fps_to(b["points"].to(self.device), self.npoints), b["label"].reshape(-1))
                             for b in _loader(self.dataset, self.batch_size)]
        with _eval_mode(model):
            logits = torch.cat([model.logits(pts).float().cpu() for pts, _ in self._batches])
        labels = torch.cat([y for _, y in self._batches])
        return accuracy_metrics(logits, labels, self.name)


# ---------------------------------------------------------------------------------------- runner
def build_finetune_model(cfg: Mapping[str, Any], *, ckpt: str | None = None, scratch: bool = False,
                         kind: type | None = None, task: str = "fine-tuning"
                         ) -> tuple[nn.Module, dict[str, Any]]:
    """The config's fine-tuning model (a :class:`~models.base.Classifier`, or ``kind``), with a pre-trained
    encoder from ``ckpt`` unless ``scratch``; ``task`` names the job in error messages."""
    from models.base import Classifier
    from tools.builders import build_model_from_cfg
    from tools.pretrained import load_pretrained_encoder

    kind = kind or Classifier
    if bool(ckpt) == bool(scratch):
        raise ConfigError(f"{task} needs exactly one of --finetune CKPT (pre-trained encoder) or --scratch "
                          "(random initialisation)")
    if cfg["finetune"]["source"] not in ("student", "ema", "teacher"):
        raise ConfigError(f"finetune.source must be 'student', 'ema' (model_ema weights; a GM3D checkpoint without "
                          f"them: its EMA teacher) or 'teacher' (GM3D's EMA teacher), got {cfg['finetune']['source']!r}")
    torch.manual_seed(int(cfg["seed"]))
    model = build_model_from_cfg(cfg)
    if not isinstance(model, kind):
        raise ConfigError(f"model.NAME {cfg['model']['NAME']} is not a {kind.__name__} ({task} needs one), "
                          f"it is a {type(model).__name__}")
    info: dict[str, Any] = {"init": "scratch"}
    if ckpt:
        info = load_pretrained_encoder(model, ckpt, source=cfg["finetune"]["source"])
        info["init"] = str(ckpt)
    return model, info


def check_best_metric(cfg: Mapping[str, Any], allowed=("test_acc", "test_macc", "val_acc", "val_macc")) -> None:
    """Fine-tuning selects ckpt-best on an accuracy it computes; anything else is a config error."""
    if cfg["eval"]["best_metric"] not in allowed:
        raise ConfigError(f"eval.best_metric is '{cfg['eval']['best_metric']}'; fine-tuning produces "
                          f"{', '.join(allowed)} (val_* with a dataset.val section); set eval.best_metric: test_acc")


def _check_classes(model: nn.Module, dataset: Dataset, what: str, allow_wider_head: bool = False) -> None:
    """The classifier head must have one output per class of the data. ``allow_wider_head`` keeps the
    official few-shot protocol (a 40-output head for 5/10-way episodes) possible."""
    n = getattr(dataset, "num_classes", None)
    cls_dim = getattr(model, "cls_dim", None)
    if n is not None and cls_dim is not None:
        if n > cls_dim or (n < cls_dim and not allow_wider_head):
            raise ConfigError(f"{what} has {n} classes but model.cls_dim is {cls_dim}: set model.cls_dim={n} "
                              f"(or pass --data PATH to take it from the data)")
        if n < cls_dim:
            log.info("%s has %d classes, the head has %d outputs (as the official few-shot 40-way head)",
                     what, n, cls_dim)


def vote_last_and_best(summary: dict[str, Any], out: Path, model: nn.Module, rebuild: Callable[[], nn.Module],
                       device: torch.device, score: Callable[[nn.Module], Any]) -> None:
    """``summary['vote_last']``: ``score`` of the last-epoch ``model``; ``summary['vote_best']``: of
    ``<out>/ckpt-best.pth`` loaded into ``rebuild()`` (the last epoch's value when it is the best)."""
    from tools.pretrained import load_finetuned

    summary["vote_last"] = score(model)
    best_path = out / "ckpt-best.pth"
    if best_path.exists() and summary.get("best_epoch") != summary.get("last_epoch"):
        best_model = rebuild()
        load_finetuned(best_model, best_path)
        summary["vote_best"] = score(best_model.to(device))
    else:
        summary["vote_best"] = summary["vote_last"]


def _vote_report(model, test_set, cfg, device, seed: int | None = None) -> dict[str, float]:
    from tools.builders import build_transform

    fc = cfg["finetune"]
    seed = int(cfg["seed"]) if seed is None else seed
    logits, labels = vote_logits(model, test_set, int(cfg["npoints"]), votes=int(fc["votes"]), seed=seed,
                                 point_all=fc["point_all"], augment=build_transform(cfg),
                                 batch_size=int(fc["eval_bs"]), device=device)
    return accuracy_metrics(logits, labels, "vote")


def vote_repeats(model, test_set, cfg, device) -> list[dict[str, float]]:
    """``finetune.vote_repeats`` independent votes: repeat ``r`` is :func:`vote_logits` seeded by
    ``seed + r`` (repeat 0 is the single vote of ``vote_repeats: 1``)."""
    n = int(cfg["finetune"].get("vote_repeats", 1))
    if n < 1:
        raise ConfigError(f"finetune.vote_repeats must be >= 1, got {n}")
    return [_vote_report(model, test_set, cfg, device, seed=int(cfg["seed"]) + r) for r in range(n)]


def repeat_stats(accs: list[float], key: str) -> dict[str, Any]:
    """``{key}_repeats`` (each repeat), ``{key}_mean``, ``{key}_std`` (sample std, 0 for one repeat) and
    ``{key}_max`` (the official number is the max over its repeats: optimistic, labelled "max of N")."""
    mean, std = mean_std(accs)
    return {f"{key}_repeats": list(accs), f"{key}_mean": mean, f"{key}_std": std, f"{key}_max": max(accs)}


def run_finetune(config: str, opts: list[str], *, exp_name: str = "default", run_dir: str | None = None,
                 ckpt: str | None = None, scratch: bool = False, test: str | None = None,
                 vote: bool = False, resume: bool = False, accept_config_change: bool = False) -> dict[str, Any]:
    """Fine-tune (or, with ``test``, only evaluate) a classifier; prints and returns the summary."""
    from tools.pretrained import load_finetuned
    from tools.builders import build_model_from_cfg, build_split, build_transform
    from tools.engine import Trainer
    from tools.runs import prepare_run
    from utils import dist

    if test and run_dir is None:  # keep a training run's folder (and its config.yaml) untouched
        run_dir = str(Path("experiments") / Path(config).stem / f"{exp_name}_test")
    def checks(cfg):
        if not test:
            check_best_metric(cfg)
            if str(cfg.eval.best_metric).startswith("val") and not cfg.dataset.get("val"):
                raise ConfigError(f"eval.best_metric is {cfg.eval.best_metric} but the config has no dataset.val section")

    cfg, device, out = prepare_run(config, opts, exp_name=exp_name, run_dir=run_dir, resume=resume,
                                   kind="test" if test else "finetune", accept_config_change=accept_config_change,
                                   checks=checks)
    fc = cfg.finetune
    npoints = int(cfg.npoints)
    do_vote = bool(vote or fc.vote)
    test_set = build_split(cfg, "test")
    if test:
        torch.manual_seed(int(cfg.seed))
        model = build_model_from_cfg(cfg)
        meta = load_finetuned(model, test)
        model.to(device)
        _check_classes(model, test_set, "dataset.test")
        logits, labels = predict_logits(model, test_set, npoints, batch_size=int(fc.eval_bs), device=device)
        summary: dict[str, Any] = {"mode": "test", "checkpoint": test, "checkpoint_epoch": meta.get("epoch"),
                                   **accuracy_metrics(logits, labels, "test"), "test_count": len(test_set)}
        if do_vote:
            reps = vote_repeats(model, test_set, cfg, device)
            summary.update(reps[0])                                 # vote_acc / vote_macc: repeat 0
            summary.update(repeat_stats([r["vote_acc"] for r in reps], "vote_acc"))
            summary["votes"], summary["vote_repeats"] = int(fc.votes), len(reps)
        _report(summary, out, "summary-test.json")
        return summary

    model, info = build_finetune_model(cfg, ckpt=ckpt, scratch=scratch) if not resume else \
        (build_model_from_cfg(cfg), {"init": "resumed"})
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model %s: %.2fM trainable parameters; init: %s", type(model).__name__, n_params / 1e6, info["init"])
    train_set = build_split(cfg, "train")
    _check_classes(model, train_set, "dataset.train")
    evaluators = [AccuracyEvaluator(test_set, npoints, name="test", every=int(fc.eval_every),
                                    batch_size=int(fc.eval_bs), device=device)]
    if cfg.dataset.get("val"):
        evaluators.insert(0, AccuracyEvaluator(build_split(cfg, "val"), npoints, name="val",
                                               every=int(fc.eval_every), batch_size=int(fc.eval_bs), device=device))
    transform = TrainSampling(npoints, fc.point_all, build_transform(cfg))
    trainer = Trainer(cfg, model, train_set, out, evaluators=evaluators, transform=transform, resume=resume,
                      device=device)
    summary = trainer.fit()
    summary.update({"mode": "finetune", "init": info["init"], "init_layout": info.get("layout"),
                    "left_at_init": info.get("missing"), "test_count": len(test_set)})
    best = next((r for r in trainer.history if r.get("epoch") == summary.get("best_epoch")), {})
    summary["test_acc_at_best"] = best.get("test_acc")
    if do_vote and dist.is_main_process():
        summary["votes"] = int(fc.votes)
        vote_last_and_best(summary, out, model, lambda: build_model_from_cfg(cfg), device,
                           lambda m: [r["vote_acc"] for r in vote_repeats(m, test_set, cfg, device)])
        for key in ("vote_last", "vote_best"):                    # vote_last / vote_best: repeat 0
            accs = summary[key]
            summary.update(repeat_stats(accs, key))
            summary[key] = accs[0]
        summary["vote_repeats"] = len(summary["vote_last_repeats"])
    if dist.is_main_process():
        _report(summary, out, "summary.json")
    dist.cleanup()
    return summary


def _votes_text(summary: Mapping[str, Any], once: str = "") -> str:
    n = int(summary.get("vote_repeats", 1))
    return f"{summary['votes']} votes, seeded" + (f", {n} repeats (seed + r)" if n > 1 else once)


def _vote_text(summary: Mapping[str, Any], key: str) -> str:
    """One vote: its accuracy; several repeats: mean ± sample std (the headline), then the max labelled."""
    n = int(summary.get("vote_repeats", 1))
    if n == 1:
        return f"{summary[key]:.2f} %"
    return (f"{summary[key + '_mean']:.2f} ± {summary[key + '_std']:.2f} % (mean ± std of {n} repeats; "
            f"max of {n}, the official statistic: {summary[key + '_max']:.2f} %)")


def _report(summary: dict[str, Any], out: Path, name: str) -> None:
    lines = [f"run folder: {out}"]
    if summary.get("mode") == "test":
        lines.append(f"checkpoint {summary['checkpoint']} (epoch {summary.get('checkpoint_epoch')})")
        lines.append(f"test accuracy (FPS, no voting): {summary['test_acc']:.2f} %  "
                     f"(mean class accuracy {summary['test_macc']:.2f} %)")
        if summary.get("test_count"):
            lines.append(f"  {format_accuracy(summary['test_acc'], summary['test_count'])}")
        if "vote_acc" in summary:
            lines.append(f"test accuracy with voting ({_votes_text(summary, ', computed once')}): "
                         f"{_vote_text(summary, 'vote_acc')}")
    else:
        last = summary.get("last") or {}
        key = summary.get("best_metric")
        if "test_acc" in last:
            lines.append(f"test accuracy, last epoch ({summary['last_epoch']}): {last['test_acc']:.2f} %  "
                         f"(mean class accuracy {last.get('test_macc', float('nan')):.2f} %)")
            if summary.get("test_count"):
                lines.append(f"  {format_accuracy(last['test_acc'], summary['test_count'])}")
        if summary.get("best_value") is not None:
            split = "the test split: optimistic, the official protocol" if key.startswith("test") else "dataset.val"
            label = {"test_acc": "test accuracy", "val_acc": "val accuracy", "test_macc": "test mean class accuracy",
                     "val_macc": "val mean class accuracy"}.get(key, key)
            lines.append(f"{label}, best epoch ({summary['best_epoch']}, selected on {split}): "
                         f"{summary['best_value']:.2f} %")
            if key != "test_acc" and summary.get("test_acc_at_best") is not None:
                lines.append(f"test accuracy at that epoch ({summary['best_epoch']}): "
                             f"{summary['test_acc_at_best']:.2f} %")
        if "vote_last" in summary:
            lines.append(f"test accuracy with voting ({_votes_text(summary)}), last epoch "
                         f"({summary['last_epoch']}): {_vote_text(summary, 'vote_last')}")
            lines.append(f"test accuracy with voting ({_votes_text(summary)}), best epoch "
                         f"({summary['best_epoch']}): {_vote_text(summary, 'vote_best')}")
    text = json.dumps(summary, indent=2, default=str)
    atomic_write(out / name, lambda f: f.write(text), binary=False)
    print("\n".join(lines), flush=True)
