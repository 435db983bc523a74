"""Pre-training: the config's masked autoencoder on the engine, with the periodic linear-SVM evaluation (and the
visual diagnostics of ``vis.*``), and its report (``summary.json`` and the SVM lines)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from tools.engine.runs import prepare_run
from tools.engine.trainer import Trainer
from utils import dist
from utils.errors import ConfigError
from utils.io import atomic_write

log = logging.getLogger(__name__)

__all__ = ["run_pretrain", "check_pretrain_best_metric", "PRETRAIN_BEST_METRICS"]


def run_pretrain(config: str, opts: list[str], *, exp_name: str = "default", run_dir: str | None = None,
                 resume: bool = False, stop_after_epoch: int | None = None,
                 start_ckpts: str | None = None, accept_config_change: bool = False) -> dict[str, Any]:
    """Pre-train the config's model. ``start_ckpts``: initialise it from a pre-training checkpoint
    (official or this project's; strict key check, see :func:`tools.tasks.pretrained.load_start_checkpoint`)
    and train with a fresh optimizer and schedule."""
    from tools.engine.builders import build_model_from_cfg, build_split, build_svm_sets, build_transform
    from tools.tasks.pretrained import load_start_checkpoint
    from tools.tasks.svm import SVMEvaluator

    if start_ckpts and resume:
        raise ConfigError("--start_ckpts initialises a new run; --resume continues one with its own weights: "
                          "pass one of them")
    cfg, device, out = prepare_run(config, opts, exp_name=exp_name, run_dir=run_dir, resume=resume,
                                   accept_config_change=accept_config_change, checks=check_pretrain_best_metric)
    torch.manual_seed(cfg.seed)
    model = build_model_from_cfg(cfg)
    if start_ckpts:
        load_start_checkpoint(model, start_ckpts)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model %s: %.2fM trainable parameters", type(model).__name__, n_params / 1e6)
    train_set = build_split(cfg, "train")
    evaluators = []
    svm_test = None
    if cfg.eval.svm_every > 0:
        svm_train, svm_test = build_svm_sets(cfg)
        evaluators.append(SVMEvaluator(svm_train, svm_test, every=cfg.eval.svm_every, C=cfg.eval.svm_C,
                                       batch_size=cfg.eval.svm_bs, device=device,
                                       C_grid=cfg.eval.svm_C_grid, standardize=cfg.eval.svm_standardize))
    if cfg.vis.gc_every > 0 or cfg.vis.probe_every > 0:  # both read the SVM test split (built once), else train
        vis_set = train_set if not cfg.dataset.svm_test else \
            svm_test if svm_test is not None else build_split(cfg, "svm_test")
    if cfg.vis.gc_every > 0:
        from tools.vis.evaluator import GCPanelEvaluator
        evaluators.append(GCPanelEvaluator(vis_set, every=cfg.vis.gc_every, out_dir=out / "vis",
                                           num_shapes=cfg.vis.num_shapes))
    if cfg.vis.probe_every > 0:
        from tools.vis.evaluator import ProbeEvaluator
        evaluators.append(ProbeEvaluator(vis_set, every=cfg.vis.probe_every, num_shapes=cfg.vis.probe_shapes))
    trainer = Trainer(cfg, model, train_set, out, evaluators=evaluators, transform=build_transform(cfg),
                      resume=resume, device=device, stop_after_epoch=stop_after_epoch)
    summary = trainer.fit()
    if cfg.eval.svm_every > 0:
        summary["svm_test_count"] = len(svm_test)
    if dist.is_main_process():
        _report(summary, out, start_ckpts=start_ckpts, resumed=resume)
    dist.cleanup()
    return summary


def _report(summary: dict[str, Any], out: Path, *, start_ckpts: str | None = None, resumed: bool = False) -> None:
    """Write ``summary.json`` and print the SVM lines; the epoch -1 line names the encoder it measured (a
    ``--start_ckpts`` file, or, on a resumed run, which cannot tell, the encoder before training)."""
    from tools.tasks.stats import format_accuracy

    lines = [f"run folder: {out}"]
    init = summary.get("init") or {}
    if "init/svm_acc" in init:
        what = (f"starting encoder (--start_ckpts {start_ckpts})" if start_ckpts else
                "encoder before training (epoch -1)" if resumed else "randomly initialised encoder")
        lines.append(f"linear SVM, {what}: {init['init/svm_acc']:.2f} %")
    n_test = summary.get("svm_test_count")
    if summary.get("last_value") is not None:
        lines.append(f"linear SVM, last epoch ({summary['last_epoch']}): {summary['last_value']:.2f} %")
        if n_test:
            lines.append(f"  {format_accuracy(summary['last_value'], n_test)}")
    ema_last = (summary.get("last") or {}).get("ema_svm_acc")
    if ema_last is not None:
        lines.append(f"linear SVM, model_ema encoder, last epoch ({summary['last_epoch']}): {ema_last:.2f} %")
        if n_test:
            lines.append(f"  {format_accuracy(ema_last, n_test)}")
    if summary.get("best_value") is not None:
        lines.append(f"linear SVM, best epoch ({summary['best_epoch']}, selected on the SVM test split): "
                     f"{summary['best_value']:.2f} %")
    text = json.dumps(summary, indent=2, default=str)
    atomic_write(out / "summary.json", lambda f: f.write(text), binary=False)
    print("\n".join(lines), flush=True)


PRETRAIN_BEST_METRICS = ("svm_acc",)


def check_pretrain_best_metric(cfg) -> None:
    """Pre-training selects ckpt-best on the linear-SVM accuracy, or on nothing (null / empty)."""
    value = cfg["eval"]["best_metric"]
    if value not in (None, "", *PRETRAIN_BEST_METRICS):
        where = cfg.where("eval.best_metric") if hasattr(cfg, "where") else "eval.best_metric"
        raise ConfigError(f"{where} = {value!r} is not a metric pre-training produces; allowed: "
                          f"{', '.join(PRETRAIN_BEST_METRICS)} or null (no ckpt-best.pth)")
