"""The one training loop every task uses.

``Trainer(cfg, model, train_set, run_dir, evaluators=...).fit()`` handles devices, precision, DDP
(``torchrun``: gloo on CPU, NCCL on GPU), gradient accumulation and clipping, the per-iteration
warm-up + cosine schedule, progress bars, TensorBoard, one JSON line of metrics per epoch, atomic
checkpoints and exact resume.

A model plugs in by returning a dict with a differentiable ``loss`` (plus detached terms to log) from
``model(batch, epoch=..., generator=...)``. The engine calls the explicit hooks of
:class:`models.base.TrainHooks` (no-ops by default, which every model of the project derives from):
``on_epoch_start(epoch, max_epoch)``, ``after_step()`` (after every optimizer step, e.g. an EMA
update) and ``extra_metrics()`` (floats for the epoch log, reset by the model at epoch start). A plain
``nn.Module`` gets the no-op hooks.

Randomness: at the start of epoch ``e`` every RNG (python, numpy, torch, the sampler, and the
generator handed to the model and the augmentations) is re-seeded from ``(seed, e, rank)``, so a run
resumed from the end of epoch ``e - 1`` repeats the uninterrupted run's epoch ``e`` exactly.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from models.base import TrainHooks
from tools import checkpoint as ckpt_io
from tools.optim import build_optimizer, lr_at, set_lr
from utils import dist
from utils.misc import derive_seed, seed_everything, to_device, unwrap

log = logging.getLogger(__name__)

__all__ = ["Trainer", "Evaluator", "NonFiniteLossError", "autocast_context"]


def hooks_of(model: nn.Module) -> TrainHooks:
    """The model itself when it implements :class:`~models.base.TrainHooks`, else the no-op hooks."""
    return model if isinstance(model, TrainHooks) else TrainHooks()


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stops (last checkpoint kept)."""


class Evaluator(Protocol):
    """Periodic evaluation: ``every`` epochs, returns named float metrics."""

    name: str
    every: int

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]: ...


def autocast_context(device: torch.device, precision: str):
    """``torch.autocast`` for bf16/fp16, a no-op context for fp32."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def _collate_points(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        elif isinstance(vals[0], (int, float)):
            out[key] = torch.tensor(vals)
        else:
            out[key] = vals
    return out


class Trainer:
    """Runs ``cfg.max_epoch`` epochs of ``model`` on ``train_set``.

    Args:
        cfg: resolved config (see ``cfgs/_base_/default.yaml``).
        model: module returning ``{"loss": ..., <term>: ...}``.
        train_set: map-style data set of dict items.
        run_dir: experiment folder (checkpoints, config, logs, metrics.jsonl, tensorboard/).
        evaluators: periodic evaluations; the metric named ``cfg.eval.best_metric`` selects ckpt-best.
        transform: batch augmentation ``t(points (B,N,3), generator) -> (B,N',3)`` applied on device; a
            transform with a ``per_point_keys`` attribute is called with ``extra={key: batch[key]}`` for
            those keys and returns ``(points, extra)``, which replaces them (part labels stay aligned).
        resume: continue from ``run_dir/ckpt-last.pth``.
        stop_after_epoch: leave the loop after this epoch (checkpoint written), as a preempted job
            would; the planned schedule (``max_epoch``, curriculum, cosine) is unchanged.
        device: torch device (default: from ``cfg.device``).
    """

    def __init__(self, cfg: Mapping[str, Any], model: nn.Module, train_set: Dataset, run_dir: str | Path, *,
                 evaluators: Sequence[Evaluator] = (), transform: Callable | None = None,
                 resume: bool = False, device: torch.device | None = None, stop_after_epoch: int | None = None,
                 optimizer_builder: Callable[[nn.Module], torch.optim.Optimizer] | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.device = device or torch.device("cpu")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.max_epoch = int(cfg["max_epoch"])
        self.stop_after_epoch = stop_after_epoch
        self.seed = int(cfg["seed"])
        self.precision = cfg["precision"]
        self.accum = int(cfg["step_per_update"])
        self.clip = cfg.get("grad_norm_clip")
        self.transform = transform
        self.evaluators = list(evaluators)
        self.best_key = cfg["eval"]["best_metric"]
        self.model = model.to(self.device)
        self.base_lr = float(cfg["optimizer"]["kwargs"]["lr"])
        self.optimizer = (optimizer_builder or (lambda m: build_optimizer(m, cfg["optimizer"])))(self.model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model: nn.Module = nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=bool(cfg.get("find_unused_parameters", False)))
        else:
            self.ddp_model = self.model
        per_rank_bs = int(cfg["total_bs"]) // self.world
        if per_rank_bs < 1:
            raise ValueError(f"total_bs {cfg['total_bs']} is smaller than the world size {self.world}")
        if len(train_set) < per_rank_bs * self.world:
            raise ValueError(f"the training set has {len(train_set)} items, fewer than one batch "
                             f"(total_bs={cfg['total_bs']})")
        self.train_set = train_set
        if self.world > 1:
            self.sampler = DistributedSampler(train_set, shuffle=True, seed=self.seed, drop_last=True)
        else:
            self.sampler = None
        self.loader_gen = torch.Generator()
        self.loader = DataLoader(
            train_set, batch_size=per_rank_bs, shuffle=False,
            sampler=self.sampler or RandomSampler(train_set, generator=self.loader_gen),
            drop_last=True, num_workers=int(cfg["num_workers"]), collate_fn=_collate_points,
            persistent_workers=False, pin_memory=self.device.type == "cuda")
        self.start_epoch = 0
        self.best: dict[str, Any] = {"value": None, "epoch": None}
        self.history: list[dict[str, Any]] = []
        self.writer = None
        if resume:
            self._resume()

    # ------------------------------------------------------------------ checkpoints
    def state(self, epoch: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        m = unwrap(self.model)
        return {
            "format": ckpt_io.FORMAT,
            "model_name": type(m).__name__,
            "base_model": m.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "metrics": dict(metrics),
            "best_metrics": {self.best_key: self.best["value"], "epoch": self.best["epoch"]}
            if self.best_key else {},
            "config": self.cfg.to_dict() if hasattr(self.cfg, "to_dict") else dict(self.cfg),
            "rng": ckpt_io.rng_state(),
        }

    def _resume(self) -> None:
        path = self.run_dir / "ckpt-last.pth"
        state = ckpt_io.load_file(path)
        m = unwrap(self.model)
        if state.get("model_name") not in (None, type(m).__name__):
            raise ckpt_io.CheckpointError(
                f"{path} was written by model {state['model_name']}, this run builds {type(m).__name__}")
        ckpt_io.load_state_dict_checked(m, ckpt_io.extract_state_dict(state, path), what=str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"]) + 1
        best = state.get("best_metrics") or {}
        self.best = {"value": best.get(self.best_key), "epoch": best.get("epoch")}
        ckpt_io.set_rng_state(state["rng"])
        metrics_file = self.run_dir / "metrics.jsonl"
        if metrics_file.exists():
            lines = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
            self.history = [x for x in lines if x.get("epoch", -1) < self.start_epoch]
        log.info("resumed from %s at epoch %d", path, self.start_epoch)

    def _save(self, epoch: int, metrics: Mapping[str, Any], improved: bool) -> None:
        if not self.is_main:
            return
        state = self.state(epoch, metrics)
        ckpt_io.atomic_save(state, self.run_dir / "ckpt-last.pth")
        if improved:
            ckpt_io.atomic_save(state, self.run_dir / "ckpt-best.pth")
        every = int(self.cfg["save_every"])
        if every and (epoch + 1) % every == 0:
            ckpt_io.atomic_save(state, self.run_dir / f"ckpt-epoch-{epoch:03d}.pth")

    # ------------------------------------------------------------------ logging
    def _log_epoch(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if not self.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.history)
        if self.cfg["log"]["tensorboard"]:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            for k, v in record.items():
                if k != "epoch" and isinstance(v, (int, float)) and v is not None:
                    self.writer.add_scalar(k, v, record["epoch"])
            self.writer.flush()
        shown = ", ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        log.info("epoch %s", shown)

    def evaluate(self, epoch: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for ev in self.evaluators:
            if ev.every > 0 and ((epoch + 1) % ev.every == 0 or epoch + 1 == self.max_epoch or epoch < 0):
                if self.is_main:
                    out.update(ev(unwrap(self.model), epoch))
        dist.barrier()
        return out

    # ------------------------------------------------------------------ loop
    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        model, opt = self.ddp_model, self.optimizer
        model.train()
        base = derive_seed(self.seed, epoch, self.rank)
        seed_everything(base)
        self.loader_gen.manual_seed(derive_seed(self.seed, epoch, 7919))
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        gen = torch.Generator(device="cpu").manual_seed(derive_seed(base, 1))
        set_epoch = getattr(self.train_set, "set_epoch", None)  # data sets with per-epoch sampling
        if set_epoch is not None:
            set_epoch(epoch)
        hook_model = hooks_of(unwrap(self.model))
        hook_model.on_epoch_start(epoch, self.max_epoch)
        sums: dict[str, float] = defaultdict(float)
        n_iter = len(self.loader)
        t0 = time.perf_counter()
        samples = 0
        bar = None
        if self.is_main and self.cfg["log"]["progress_bar"]:
            from tqdm import tqdm
            bar = tqdm(total=n_iter, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
        opt.zero_grad(set_to_none=True)
        for it, batch in enumerate(self.loader):
            lr = lr_at(epoch + it / n_iter, self.base_lr, self.cfg["scheduler"])
            set_lr(opt, lr)
            batch = to_device(batch, self.device)
            if self.transform is not None:
                carried = [k for k in getattr(self.transform, "per_point_keys", ()) if k in batch]
                if carried:  # per-point labels move with the points (datasets/transforms.py)
                    batch["points"], moved = self.transform(batch["points"], gen,
                                                            extra={k: batch[k] for k in carried})
                    batch.update(moved)
                else:
                    batch["points"] = self.transform(batch["points"], gen)
            with autocast_context(self.device, self.precision):
                out = model(batch, epoch=epoch, generator=gen)
            loss = out["loss"]
            if not math.isfinite(loss.item()):
                terms = {k: float(v.detach()) for k, v in out.items() if k != "loss" and torch.is_tensor(v) and v.numel() == 1}
                raise NonFiniteLossError(
                    f"non-finite loss {loss.item()} at epoch {epoch}, iteration {it} (terms: {terms}); "
                    f"the run stops here, the last good checkpoint is {self.run_dir / 'ckpt-last.pth'}. "
                    f"Try a lower optimizer.kwargs.lr, grad_norm_clip, or precision=fp32.")
            self.scaler.scale(loss / self.accum).backward()
            if (it + 1) % self.accum == 0 or it + 1 == n_iter:
                if self.clip:
                    self.scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(self.model.parameters(), float(self.clip))
                self.scaler.step(opt)
                self.scaler.update()
                opt.zero_grad(set_to_none=True)
                hook_model.after_step()
            for k, v in out.items():
                if torch.is_tensor(v) and v.numel() == 1:
                    sums[k] += float(v.detach())
            samples += batch["points"].shape[0]
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.4g}", lr=f"{lr:.2e}")
                bar.update()
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        metrics = {f"train/{k}": v / n_iter for k, v in sums.items()}
        metrics.update({f"train/{k}": v for k, v in hook_model.extra_metrics().items()})
        metrics = dist.all_reduce_mean(metrics, self.device)
        metrics["lr"] = lr
        metrics["time_s"] = elapsed
        metrics["samples_per_s"] = samples * self.world / max(elapsed, 1e-9)
        return metrics

    def fit(self) -> dict[str, Any]:
        """Train to ``max_epoch``; returns a summary with the last- and best-epoch metrics labelled."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.start_epoch == 0 and self.cfg["eval"]["at_start"] and self.evaluators:
            init = self.evaluate(-1)
            self._log_epoch({"epoch": -1, **{f"init/{k}": v for k, v in init.items()}})
        for epoch in range(self.start_epoch, self.max_epoch):
            metrics = self.train_one_epoch(epoch)
            metrics.update(self.evaluate(epoch))
            improved = False
            if self.best_key and metrics.get(self.best_key) is not None:
                value = metrics[self.best_key]
                if self.best["value"] is None or value > self.best["value"]:
                    self.best = {"value": value, "epoch": epoch}
                    improved = True
            record = {"epoch": epoch, **metrics}
            if self.best_key and self.best["value"] is not None:
                record[f"best/{self.best_key}"] = self.best["value"]
                record["best/epoch"] = self.best["epoch"]
            self._save(epoch, metrics, improved)
            self._log_epoch(record)
            if self.stop_after_epoch is not None and epoch >= self.stop_after_epoch:
                log.info("stopping after epoch %d as asked; continue with --resume", epoch)
                break
        if self.writer is not None:
            self.writer.close()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        last = next((r for r in reversed(self.history) if r.get("epoch", -1) >= 0), {})
        out: dict[str, Any] = {"last_epoch": last.get("epoch"), "last": last}
        if self.best_key:
            out["best_metric"] = self.best_key
            out["best_value"] = self.best["value"]
            out["best_epoch"] = self.best["epoch"]
            out["last_value"] = last.get(self.best_key)
        init = next((r for r in self.history if r.get("epoch") == -1), None)
        if init:
            out["init"] = init
        return out
