"""Run set-up shared by the entry scripts: config, devices, DDP, run folder, logging, summary."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from tools.checkpoint import CheckpointError
from tools.engine import NonFiniteLossError, Trainer
from utils import dist
from utils.config import load_config, save_config
from utils.errors import ConfigError, DataError
from utils.logging import setup_logging
from utils.misc import git_sha, native_bf16, resolve_device

log = logging.getLogger(__name__)

USER_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLossError, FileNotFoundError)


def prepare_run(config: str, opts: list[str], *, exp_name: str = "default", run_dir: str | None = None,
                resume: bool = False, kind: str = "pretrain"):
    """Load the config, initialise devices / DDP / logging, create and record the run folder."""
    cfg = load_config(config, opts)
    device = resolve_device(cfg.device)
    rank, world = dist.init_distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    out = Path(run_dir) if run_dir else Path("experiments") / Path(config).stem / exp_name
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if (out / "ckpt-last.pth").exists() and not resume:
            raise ConfigError(f"{out} already holds a run (ckpt-last.pth); pass --resume to continue it or "
                              f"choose another --exp_name / --run_dir")
    dist.barrier()
    setup_logging(out / f"{kind}.log", rank)
    if rank == 0:
        save_config(cfg, out / "config.yaml")
    log.info("git %s | config %s | run %s | device %s | world %d | threads %d | precision %s",
             git_sha(), config, out, device, world, torch.get_num_threads(), cfg.precision)
    log.info("overrides: %s", " ".join(opts) or "(none)")
    if cfg.precision == "bf16" and not native_bf16(device):
        log.warning("precision bf16 on %s without native bf16 matmuls: autocast emulates them and runs "
                    "several times slower than fp32 here (bench/README.md); consider precision=fp32", device)
    return cfg, device, out


def run_pretrain(config: str, opts: list[str], *, exp_name: str = "default", run_dir: str | None = None,
                 resume: bool = False, stop_after_epoch: int | None = None,
                 start_ckpts: str | None = None) -> dict[str, Any]:
    """Pre-train the config's model. ``start_ckpts``: initialise it from a pre-training checkpoint
    (official or this project's; strict key check, see :func:`tools.pretrained.load_start_checkpoint`)
    and train with a fresh optimizer and schedule."""
    from tools.builders import build_model_from_cfg, build_split, build_svm_sets, build_transform
    from tools.pretrained import load_start_checkpoint
    from tools.svm import SVMEvaluator

    if start_ckpts and resume:
        raise ConfigError("--start_ckpts initialises a new run; --resume continues one with its own weights: "
                          "pass one of them")
    cfg, device, out = prepare_run(config, opts, exp_name=exp_name, run_dir=run_dir, resume=resume)
    torch.manual_seed(cfg.seed)
    model = build_model_from_cfg(cfg)
    if start_ckpts:
        load_start_checkpoint(model, start_ckpts)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model %s: %.2fM trainable parameters", type(model).__name__, n_params / 1e6)
    train_set = build_split(cfg, "train")
    evaluators = []
    if cfg.eval.svm_every > 0:
        svm_train, svm_test = build_svm_sets(cfg)
        evaluators.append(SVMEvaluator(svm_train, svm_test, every=cfg.eval.svm_every, C=cfg.eval.svm_C,
                                       batch_size=cfg.eval.svm_bs, device=device,
                                       C_grid=cfg.eval.svm_C_grid, standardize=cfg.eval.svm_standardize))
    if cfg.vis.gc_every > 0:
        from tools.vis.evaluator import GCPanelEvaluator
        vis_set = build_split(cfg, "svm_test") if cfg.dataset.svm_test else train_set
        evaluators.append(GCPanelEvaluator(vis_set, every=cfg.vis.gc_every, out_dir=out / "vis",
                                           num_shapes=cfg.vis.num_shapes))
    trainer = Trainer(cfg, model, train_set, out, evaluators=evaluators, transform=build_transform(cfg),
                      resume=resume, device=device, stop_after_epoch=stop_after_epoch)
    summary = trainer.fit()
    if cfg.eval.svm_every > 0:
        summary["svm_test_count"] = len(svm_test)
    if dist.is_main_process():
        _report(summary, out)
    dist.cleanup()
    return summary


def _report(summary: dict[str, Any], out: Path) -> None:
    from tools.stats import format_accuracy

    lines = [f"run folder: {out}"]
    init = summary.get("init") or {}
    if "init/svm_acc" in init:
        lines.append(f"linear SVM, randomly initialised encoder: {init['init/svm_acc']:.2f} %")
    n_test = summary.get("svm_test_count")
    if summary.get("last_value") is not None:
        lines.append(f"linear SVM, last epoch ({summary['last_epoch']}): {summary['last_value']:.2f} %")
        if n_test:
            lines.append(f"  {format_accuracy(summary['last_value'], n_test)}")
    if summary.get("best_value") is not None:
        lines.append(f"linear SVM, best epoch ({summary['best_epoch']}, selected on the SVM test split): "
                     f"{summary['best_value']:.2f} %")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print("\n".join(lines), flush=True)
