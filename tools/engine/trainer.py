"""The one training loop every task uses.

``Trainer(cfg, model, train_set, run_dir, evaluators=...).fit()`` handles devices, precision, DDP
(``torchrun``: gloo on CPU, NCCL on GPU), gradient accumulation and clipping, the per-iteration
warm-up + cosine schedule, progress (a bar on a terminal, a few log lines otherwise:
:mod:`tools.engine.progress`), TensorBoard, one JSON line of metrics per epoch, atomic checkpoints and exact
resume. ``ckpt-last.pth`` is the epoch commit and carries the metric history;
ckpt-best.pth, metrics.jsonl and summary.json follow it and are repaired from it on resume (:mod:`tools.engine.recovery`;
docs/RELIABILITY.md).

Host syncs: the loop reads no device value per iteration unless ``log.sync_every`` is 1. The logged
terms are summed on the device; every ``sync_every`` iterations (and at the epoch end) one read checks
the losses of the window for NaN/inf and updates the progress bar. ``sync_every: null`` (the default)
means 1 on CPU, where a read costs nothing and a NaN stops the run at the failing batch, before its
update, and :data:`CUDA_SYNC_EVERY` on CUDA, where a read per step stalls the launch queue.
``compile.enabled`` runs the training forward through ``torch.compile`` (docs/ARCHITECTURE.md).

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

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from models.base import TrainHooks
from models.ema import build_model_ema
from tools.engine import checkpoint as ckpt_io
from tools.engine.optim import build_optimizer, lr_at, set_lr
from tools.engine.progress import EpochProgress
from tools.engine.recovery import (METRICS, PREVIOUS, SUMMARY, history_of, last_good_checkpoint, last_good_message,
                                   metrics_text, reconcile)
from utils import dist
from utils.errors import CheckpointError, ConfigError
from utils.io import atomic_write, remove_stale_temps
from utils.misc import derive_seed, seed_everything, to_device, unwrap

log = logging.getLogger(__name__)

__all__ = ["Trainer", "Evaluator", "NonFiniteLossError", "autocast_context", "data_problem", "collate_points"]

HUGE_COORDINATE = 1e6
CUDA_SYNC_EVERY = 50
"""Iterations between host reads of the losses on CUDA when ``log.sync_every`` is null."""
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")


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


def data_problem(points: torch.Tensor) -> str | None:
    """Why a batch of raw input points cannot train a model (non-finite or |x| > 1e6), or None."""
    pts = points.detach().float()
    if not torch.isfinite(pts).all():
        n = int((~torch.isfinite(pts)).sum())
        return f"{n} non-finite coordinate values (NaN/inf) in the batch"
    peak = float(pts.abs().max()) if pts.numel() else 0.0
    if peak > HUGE_COORDINATE:
        return f"coordinates up to {peak:.3g} in the batch (|x| > {HUGE_COORDINATE:.0e})"
    return None


def compile_forward(module: nn.Module, spec: Mapping[str, Any] | None, where: str = "compile") -> nn.Module:
    """``module`` itself, or ``torch.compile(module, backend=..., mode=..., dynamic=...)`` when
    ``spec["enabled"]``; the compiled wrapper shares the module's parameters (checkpoints keep the plain
    module's keys because the engine saves the unwrapped model)."""
    spec = dict(spec or {})
    if not spec.get("enabled"):
        return module
    backend = spec.get("backend") or "inductor"
    if backend not in COMPILE_BACKENDS:
        raise ConfigError(f"{where}.backend = {backend!r}; expected one of {', '.join(COMPILE_BACKENDS)}")
    kwargs: dict[str, Any] = {"backend": backend, "dynamic": spec.get("dynamic")}
    if spec.get("mode") is not None:
        if backend != "inductor":
            raise ConfigError(
                f"{where}.mode = {spec['mode']!r} needs {where}.backend = inductor, not {backend!r}")
        kwargs["mode"] = spec["mode"]
    return torch.compile(module, **kwargs)


def _bad_input(points: torch.Tensor) -> torch.Tensor:
    """A device bool: whether ``points`` has a NaN/inf or a coordinate beyond 1e6 (:func:`data_problem`
    without the host read)."""
    pts = points.detach()
    if not pts.numel():
        return torch.zeros((), dtype=torch.bool, device=pts.device)
    return ~torch.isfinite(pts).all() | (pts.abs().amax() > HUGE_COORDINATE)


def collate_points(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The engine's batch collation: tensors stacked, numbers as a tensor, anything else as a list."""
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
                 write_summary: bool = True):
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
        # weight averaging (model_ema section, models/ema.py): None when off, so nothing changes then
        self.model_ema = build_model_ema(cfg.get("model_ema"), self.model,
                                         cfg.where("model_ema") if hasattr(cfg, "where") else "model_ema")
        self.base_lr = float(cfg["optimizer"]["kwargs"]["lr"])
        self.optimizer = build_optimizer(self.model, cfg["optimizer"])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model: nn.Module = nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=bool(cfg.get("find_unused_parameters", False)))
        else:
            self.ddp_model = self.model
        per_rank_bs = int(cfg["total_bs"]) // self.world
        where = cfg.where("total_bs") if hasattr(cfg, "where") else "total_bs"
        if per_rank_bs < 1:
            raise ConfigError(f"{where} = {cfg['total_bs']} is smaller than the world size {self.world}; "
                              f"allowed: {self.world} <= total_bs <= {len(train_set)} (the training set size)")
        if len(train_set) < per_rank_bs * self.world:
            raise ConfigError(f"{where} = {cfg['total_bs']} is larger than the training set ({len(train_set)} "
                              f"items); allowed: 1 <= total_bs <= {len(train_set)}")
        self.train_set = train_set
        self.train_forward = compile_forward(self.ddp_model, cfg.get("compile"))
        sync_every = (cfg.get("log") or {}).get("sync_every")
        if sync_every is not None and (isinstance(sync_every, bool) or not isinstance(sync_every, int)
                                       or sync_every < 1):
            raise ConfigError(f"log.sync_every = {sync_every!r}; expected an integer >= 1, or null (auto: 1 "
                              f"on CPU, {CUDA_SYNC_EVERY} on CUDA)")
        self.sync_every = sync_every or (CUDA_SYNC_EVERY if self.device.type == "cuda" else 1)
        if self.world > 1:
            self.sampler = DistributedSampler(train_set, shuffle=True, seed=self.seed, drop_last=True)
        else:
            self.sampler = None
        self.loader_gen = torch.Generator()
        self.loader = DataLoader(
            train_set, batch_size=per_rank_bs, shuffle=False,
            sampler=self.sampler or RandomSampler(train_set, generator=self.loader_gen),
            drop_last=True, num_workers=int(cfg["num_workers"]), collate_fn=collate_points,
            persistent_workers=False, pin_memory=self.device.type == "cuda")
        self.start_epoch = 0
        self.best: dict[str, Any] = {"value": None, "epoch": None}
        self.history: list[dict[str, Any]] = []
        self.writer = None
        self.write_summary = write_summary
        if self.is_main:
            remove_stale_temps(self.run_dir)
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
            "history": [dict(r) for r in self.history],
            **({"model_ema": self.model_ema.ema_state(), "model_ema_updates": self.model_ema.num_updates}
               if self.model_ema is not None else {}),
        }

    def _resume(self) -> None:
        path = self.run_dir / "ckpt-last.pth"
        state = ckpt_io.load_file(path)
        m = unwrap(self.model)
        if state.get("model_name") not in (None, type(m).__name__):
            raise ckpt_io.CheckpointError(
                f"{path} was written by model {state['model_name']}, this run builds {type(m).__name__}")
        ckpt_io.load_state_dict_checked(m, ckpt_io.extract_state_dict(state, path), what=str(path))
        if self.model_ema is not None:
            if not isinstance(state.get("model_ema"), Mapping):
                raise CheckpointError(f"{path} holds no model_ema weights (the run was started with model_ema off); "
                                      f"resume with model_ema.enabled=false or start a new run")
            self.model_ema.load_ema_state(state["model_ema"], int(state.get("model_ema_updates", 0)))
        self.optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"]) + 1
        best = state.get("best_metrics") or {}
        self.best = {"value": best.get(self.best_key), "epoch": best.get("epoch")}
        ckpt_io.set_rng_state(state["rng"])
        self.history = history_of(state, self.run_dir, path, self.start_epoch)
        if self.is_main:
            self._reconcile(state, path)
        log.info("resumed from %s at epoch %d", path, self.start_epoch)

    def _reconcile(self, state: Mapping[str, Any], path: Path) -> None:
        """Bring the derived files (ckpt-best.pth, metrics.jsonl, summary.json) in line with ``ckpt-last.pth``,
        the commit record of the last finished epoch (docs/RELIABILITY.md)."""
        reconcile(self.run_dir, state, path, self.history, self.best_key, self.best["epoch"])
        self._write_views()

    def _write_views(self) -> None:
        """metrics.jsonl and summary.json from ``self.history`` (each an atomic rewrite)."""
        atomic_write(self.run_dir / METRICS, lambda f: f.write(metrics_text(self.history)), binary=False)
        if self.write_summary:
            text = json.dumps(self.summary(), indent=2, default=str)
            atomic_write(self.run_dir / SUMMARY, lambda f: f.write(text), binary=False)

    def _commit_epoch(self, epoch: int, metrics: Mapping[str, Any], record: dict[str, Any], improved: bool) -> None:
        """Write epoch ``epoch`` in the run folder. ``ckpt-last.pth`` (which carries the metric history) is the
        commit point; ckpt-best.pth, metrics.jsonl and summary.json follow it and are repaired from it on
        resume, so after any kill and ``--resume`` all of them describe the same epoch."""
        self.history.append(record)
        if not self.is_main:
            return
        state = self.state(epoch, metrics)
        bad = next((k for k, v in state["base_model"].items()
                    if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:
            self.history.pop()
            raise NonFiniteLossError(
                f"the weights became non-finite during epoch {epoch} (first: {bad}); the checkpoint of this epoch "
                f"was not written. {self._last_good_message(None, epoch)}")
        every = int(self.cfg["save_every"])
        if every and (epoch + 1) % every == 0:
            ckpt_io.atomic_save(state, self.run_dir / f"ckpt-epoch-{epoch:03d}.pth")
        last = self.run_dir / "ckpt-last.pth"
        if last.exists():  # keep the previous epoch: the fall-back when this one turns out to be broken
            ckpt_io.replace_with_link(last, self.run_dir / PREVIOUS)
        ckpt_io.atomic_save(state, last)
        if improved:
            ckpt_io.atomic_save(state, self.run_dir / "ckpt-best.pth")
        self._write_views()
        self._show(record)

    # ------------------------------------------------------------------ logging
    def _log_epoch(self, record: dict[str, Any]) -> None:
        """A record without a checkpoint (the epoch -1 evaluation before training)."""
        self.history.append(record)
        if not self.is_main:
            return
        self._write_views()
        self._show(record)

    def _show(self, record: Mapping[str, Any]) -> None:
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

    # ------------------------------------------------------------------ non-finite losses
    def _non_finite(self, epoch: int, it: int, out: Mapping[str, Any], raw_points: torch.Tensor,
                    batch: Mapping[str, Any]) -> NonFiniteLossError:
        loss = float(out["loss"].detach())
        terms = {k: float(v.detach()) for k, v in out.items() if k != "loss" and torch.is_tensor(v) and v.numel() == 1}
        head = f"non-finite loss {loss} at epoch {epoch}, iteration {it} (terms: {terms}); the run stops here. "
        cause = data_problem(raw_points)
        if cause is not None:
            return NonFiniteLossError(
                head + f"The input batch is the cause: {cause}. Check the training data (dataset.train) rather "
                       f"than the learning rate. {self._last_good_message(None, epoch)}")
        return NonFiniteLossError(head + self._last_good_message(batch, epoch) +
                                  " Try a lower optimizer.kwargs.lr, grad_norm_clip, or precision=fp32.")

    def _check_window(self, window: Sequence[tuple[int, torch.Tensor, torch.Tensor]], epoch: int,
                      it: int) -> None:
        """One host read for the losses of ``window``; NonFiniteLossError naming the first bad iteration."""
        losses = torch.stack([w[1].float().reshape(()) for w in window])
        finite = torch.isfinite(losses)
        if bool(finite.all()):
            return
        j = int((~finite).nonzero()[0, 0])
        bad_it, value = window[j][0], float(losses[j])
        head = (f"non-finite loss {value} at epoch {epoch}, iteration {bad_it} (found by the check after "
                f"iteration {it}: log.sync_every = {self.sync_every}, so the updates since then were "
                f"applied); the run stops here. ")
        again = " Set log.sync_every=1 to stop at the failing batch itself, before its update."
        if bool(window[j][2]):
            raise NonFiniteLossError(
                head + "The input batch is the cause: non-finite (NaN/inf) or huge (|x| > "
                f"{HUGE_COORDINATE:.0e}) coordinates in it. Check the training data (dataset.train) rather "
                f"than the learning rate. {self._last_good_message(None, epoch)}{again}")
        advice = " Try a lower optimizer.kwargs.lr, grad_norm_clip, or precision=fp32."
        raise NonFiniteLossError(head + self._last_good_message(None, epoch) + advice + again)

    def _last_good_message(self, batch: Mapping[str, Any] | None, epoch: int) -> str:
        """Name the newest checkpoint of this run whose weights are finite and (given the failing batch) whose
        loss on that batch is finite (:mod:`tools.engine.recovery`)."""
        probe = None if batch is None else (lambda weights: self._finite_loss_with(weights, batch, epoch))
        return last_good_message(self.run_dir, last_good_checkpoint(self.run_dir, probe), batch is not None)

    def _finite_loss_with(self, weights: Mapping[str, torch.Tensor], batch: Mapping[str, Any], epoch: int) -> bool:
        """Whether the model with ``weights`` gives a finite loss on ``batch`` (a copy; the run's model is untouched)."""
        try:
            probe = copy.deepcopy(unwrap(self.model))
            probe.load_state_dict(dict(weights), strict=False)
            with torch.no_grad(), autocast_context(self.device, self.precision):
                out = probe(batch, epoch=epoch, generator=torch.Generator().manual_seed(0))
            return bool(math.isfinite(float(out["loss"].detach())))
        except Exception as e:  # a model that cannot be probed: say nothing good about the checkpoint
            log.warning("could not evaluate a checkpoint on the failing batch: %s: %s", type(e).__name__, e)
            return False

    def evaluate(self, epoch: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for ev in self.evaluators:
            if ev.every > 0 and ((epoch + 1) % ev.every == 0 or epoch + 1 == self.max_epoch or epoch < 0):
                if self.is_main:
                    out.update(ev(unwrap(self.model), epoch))
                    if self.model_ema is not None and epoch >= 0 and getattr(ev, "name", "") == "svm":
                        out.update({f"ema_{k}": v for k, v in ev(self.model_ema.module, epoch).items()})
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
        if self.model_ema is not None:
            self.model_ema.set_epoch(epoch)
        n_updates = 0  # optimizer steps of this epoch
        sums: dict[str, torch.Tensor] = {}  # on the device: no host read per iteration
        window: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (iteration, loss, bad input) to check
        n_iter = len(self.loader)
        t0 = time.perf_counter()
        samples = 0
        bar = None
        if self.is_main and self.cfg["log"]["progress_bar"]:  # a bar on a terminal, else a few log lines
            bar = EpochProgress(n_iter, f"epoch {epoch}")
        opt.zero_grad(set_to_none=True)
        for it, batch in enumerate(self.loader):
            lr = lr_at(epoch + it / n_iter, self.base_lr, self.cfg["scheduler"])
            set_lr(opt, lr)
            batch = to_device(batch, self.device)
            raw_points = batch["points"]
            if self.transform is not None:
                carried = [k for k in getattr(self.transform, "per_point_keys", ()) if k in batch]
                if carried:  # per-point labels move with the points (datasets/transforms.py)
                    batch["points"], moved = self.transform(batch["points"], gen,
                                                            extra={k: batch[k] for k in carried})
                    batch.update(moved)
                else:
                    batch["points"] = self.transform(batch["points"], gen)
            with autocast_context(self.device, self.precision):
                out = self.train_forward(batch, epoch=epoch, generator=gen)
            loss = out["loss"]
            if self.sync_every == 1:
                if not math.isfinite(loss.item()):
                    raise self._non_finite(epoch, it, out, raw_points, batch)
            else:
                window.append((it, loss.detach(), _bad_input(raw_points)))
            self.scaler.scale(loss / self.accum).backward()
            if (it + 1) % self.accum == 0 or it + 1 == n_iter:
                if self.clip:
                    self.scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(self.model.parameters(), float(self.clip))
                self.scaler.step(opt)
                self.scaler.update()
                opt.zero_grad(set_to_none=True)
                hook_model.after_step()
                if self.model_ema is not None:
                    self._ema_step(epoch, n_updates, n_iter)
                n_updates += 1
            for k, v in out.items():
                if torch.is_tensor(v) and v.numel() == 1:
                    term = v.detach().reshape(()).double()
                    sums[k] = sums[k] + term if k in sums else term
            samples += batch["points"].shape[0]
            synced = self.sync_every == 1
            if window and ((it + 1) % self.sync_every == 0 or it + 1 == n_iter):
                self._check_window(window, epoch, it)
                window = []
                synced = True
            if bar is not None:
                bar.update(**({"loss": f"{float(loss.detach()):.4g}", "lr": f"{lr:.2e}"} if synced else {}))
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        metrics = {f"train/{k}": float(v) / n_iter for k, v in sums.items()}
        metrics.update({f"train/{k}": v for k, v in hook_model.extra_metrics().items()})
        if self.model_ema is not None:
            metrics["train/model_ema_decay"] = self.model_ema.current_decay()
        metrics = dist.all_reduce_mean(metrics, self.device)
        metrics["lr"] = lr
        metrics["time_s"] = elapsed
        metrics["samples_per_s"] = samples * self.world / max(elapsed, 1e-9)
        return metrics

    def _ema_step(self, epoch: int, n_updates: int, n_iter: int) -> None:
        """Update the weight average after optimizer step ``n_updates`` of ``epoch`` when the run's step count
        is a multiple of ``model_ema.every``. Under DDP every rank averages its own replica (the weights are
        identical after each step); the averaged buffers are then taken from rank 0, because each rank's
        BatchNorm statistics have just seen its own batch."""
        per_epoch = -(-n_iter // self.accum)
        if (epoch * per_epoch + n_updates + 1) % self.model_ema.cfg.every:
            return
        self.model_ema.update(unwrap(self.model))
        if self.world > 1:
            for b in self.model_ema.module.buffers():
                torch.distributed.broadcast(b, 0)

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
            self._commit_epoch(epoch, metrics, record, improved)
            if self.stop_after_epoch is not None and epoch >= self.stop_after_epoch:
                log.info("stopping after epoch %d as asked; continue with --resume", epoch)
                break
        if self.is_main and self.history and self.history[-1].get("epoch") == self.max_epoch - 1:
            (self.run_dir / PREVIOUS).unlink(missing_ok=True)  # finished: the fall-back is no longer needed
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
