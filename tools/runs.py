"""Run set-up shared by the entry scripts: config, devices, DDP, run folder, logging, summary."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from tools.checkpoint import CheckpointError
from tools.engine import NonFiniteLossError, Trainer
from utils import dist
from utils.config import load_config, save_config
from utils.errors import ConfigError, DataError
from utils.io import atomic_write, remove_stale_temps
from utils.logging import setup_logging
from utils.misc import git_sha, native_bf16, resolve_device

log = logging.getLogger(__name__)

USER_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLossError, FileNotFoundError)


def run_cli(job, name: str) -> int:
    """Run an entry script's ``job()``: the errors raised on purpose for the user (:data:`USER_ERRORS`)
    become one logged line and exit code 2; anything else is a bug and keeps its traceback."""
    try:
        job()
    except USER_ERRORS as e:
        logging.getLogger(name).error("%s: %s", type(e).__name__, e)
        return 2
    return 0


def prepare_run(config: str, opts: list[str], *, exp_name: str = "default", run_dir: str | None = None,
                resume: bool = False, kind: str = "pretrain", accept_config_change: bool = False):
    """Load the config, initialise devices / DDP / logging, create, lock and record the run folder.

    Rank 0 takes the run-folder lock (a second run into the folder fails at once), refuses a folder that
    holds a run unless ``resume``, warns when it reuses a folder whose earlier run died before its first
    checkpoint, and on ``resume`` refuses a config that differs from the saved ``config.yaml`` unless
    ``accept_config_change`` (then the change is appended to ``config-changes.jsonl``).
    """
    cfg = load_config(config, opts)
    device = resolve_device(cfg.device)
    rank, world = dist.init_distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    out = Path(run_dir) if run_dir else Path("experiments") / Path(config).stem / exp_name
    notes: list[str] = []
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        lock_run_folder(out)
        if (out / "ckpt-last.pth").exists() and not resume:
            raise ConfigError(f"{out} already holds a run (ckpt-last.pth); pass --resume to continue it or "
                              f"choose another --exp_name / --run_dir")
        remove_stale_temps(out)
        if not resume and kind != "test":  # a --test folder never holds a checkpoint
            left = sorted(p.name for p in out.iterdir() if p.name in ("config.yaml", "metrics.jsonl")
                          or p.suffix == ".log")
            if left:
                notes.append(f"reusing {out}: an earlier run there died before its first checkpoint (found "
                             f"{', '.join(left)}, no ckpt-last.pth); starting it again from scratch")
        else:
            change = config_changes(out / "config.yaml", cfg)
            if change and not accept_config_change:
                raise ConfigError(f"--resume with a config that differs from {out / 'config.yaml'}: "
                                  + "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in change.items())
                                  + ". Pass --accept-config-change to continue with the new values, or resume "
                                    "with the old ones")
            if change:
                record_config_change(out, change, opts)
                notes.append("config changed on resume (accepted, recorded in config-changes.jsonl): "
                             + "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in change.items()))
    dist.barrier()
    setup_logging(out / f"{kind}.log", rank)
    for note in notes:
        log.warning("%s", note)
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
                 start_ckpts: str | None = None, accept_config_change: bool = False) -> dict[str, Any]:
    """Pre-train the config's model. ``start_ckpts``: initialise it from a pre-training checkpoint
    (official or this project's; strict key check, see :func:`tools.pretrained.load_start_checkpoint`)
    and train with a fresh optimizer and schedule."""
    from tools.builders import build_model_from_cfg, build_split, build_svm_sets, build_transform
    from tools.pretrained import load_start_checkpoint
    from tools.svm import SVMEvaluator

    if start_ckpts and resume:
        raise ConfigError("--start_ckpts initialises a new run; --resume continues one with its own weights: "
                          "pass one of them")
    cfg, device, out = prepare_run(config, opts, exp_name=exp_name, run_dir=run_dir, resume=resume,
                                   accept_config_change=accept_config_change)
    check_pretrain_best_metric(cfg)
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


# ---------------------------------------------------------------------------------------- run folder
LOCK_FILE = ".lock"
_HELD_LOCKS: dict[str, Any] = {}


def lock_run_folder(folder: Path) -> None:
    """Hold an exclusive ``fcntl.flock`` on ``folder/.lock`` until this process exits.

    A second process asking for the same folder gets a ConfigError at once, naming the folder and the
    pid recorded by the holder. Taking it again in the process that holds it is a no-op.
    """
    key = str(folder.resolve())
    if key in _HELD_LOCKS:
        return
    path = folder / LOCK_FILE
    fh = open(path, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise ConfigError(f"run folder {folder} is in use by another run (lock {path} held by {holder}); wait "
                          f"for it to finish or choose another --exp_name / --run_dir") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    fh.flush()
    _HELD_LOCKS[key] = fh


def release_run_folder(folder: Path) -> None:
    """Release the lock :func:`lock_run_folder` took (process exit releases it too)."""
    fh = _HELD_LOCKS.pop(str(Path(folder).resolve()), None)
    if fh is not None:
        fh.close()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


_MISSING = "<absent>"


def _show(value: Any) -> str:
    return value if value is _MISSING else json.dumps(value, default=str)


def config_changes(saved: Path, cfg) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` between the run's saved ``config.yaml`` and the new config."""
    if not saved.exists():
        return {}
    old = _flatten(load_config(saved, defaults=None).to_dict())
    new = _flatten(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
    return {k: (old.get(k, _MISSING), new.get(k, _MISSING)) for k in sorted(set(old) | set(new))
            if old.get(k, _MISSING) != new.get(k, _MISSING)}


def record_config_change(out: Path, change: dict[str, tuple[Any, Any]], opts: list[str]) -> None:
    """Append one JSON line describing an accepted change to ``out/config-changes.jsonl``."""
    path = out / "config-changes.jsonl"
    line = json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "overrides": list(opts),
                       "changes": {k: {"old": a, "new": b} for k, (a, b) in change.items()}}, default=str)
    previous = path.read_text() if path.exists() else ""
    atomic_write(path, lambda f: f.write(previous + line + "\n"), binary=False)
