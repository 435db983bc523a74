"""Crash recovery of a run folder: what :class:`tools.engine.trainer.Trainer` uses to resume and to name a
good checkpoint when a run fails.

``ckpt-last.pth`` is the commit record of the last finished epoch and carries the metric history. On
resume the derived files follow it: ``ckpt-best.pth`` is rewritten when the run was killed between the
commit and the best copy, and ``metrics.jsonl`` / ``summary.json`` are rewritten from the history
(:func:`reconcile`; docs/RELIABILITY.md). A checkpoint written before the history was kept in it takes
its history from the old ``metrics.jsonl`` (:func:`history_of`). When the loss or the weights become
non-finite, :func:`last_good_checkpoint` finds the newest checkpoint of the folder whose weights are
finite (and, given a probe, whose loss on the failing batch is finite) and :func:`last_good_message`
names it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tools.engine import checkpoint as ckpt_io
from utils.errors import CheckpointError

log = logging.getLogger(__name__)

__all__ = ["METRICS", "SUMMARY", "PREVIOUS", "metrics_text", "read_metrics", "metrics_mismatch", "checkpoint_epoch",
           "history_of", "reconcile", "last_good_checkpoint", "last_good_message"]

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PREVIOUS = "ckpt-prev.pth"


def metrics_text(history: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in history)


def read_metrics(path: Path, ckpt: Path) -> list[dict[str, Any]]:
    """The records of an old run's metrics.jsonl (for checkpoints without a history); a damaged file is an error."""
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CheckpointError(
                f"{path}, line {n}, is not valid JSON ({e.msg}) and {ckpt} carries no metric history to repair "
                f"it from; fix or remove that line, then resume") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("epoch"), int):
            raise CheckpointError(f"{path}, line {n}, is not a metrics record with an integer 'epoch'; fix or "
                                  f"remove it, then resume")
        records.append(rec)
    return records


def metrics_mismatch(text: str | None, history: Sequence[Mapping[str, Any]]) -> str:
    """A short description of how a metrics.jsonl differs from the checkpoint's history."""
    if text is None:
        return "is missing"
    if not text.strip():
        return "is empty" if history else "holds only blank lines"
    lines = [x for x in text.splitlines() if x.strip()]
    for n, line in enumerate(lines, 1):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            return f"has a damaged line {n} (not valid JSON: truncated or garbage)"
    epochs = [json.loads(x).get("epoch") if isinstance(json.loads(x), dict) else None for x in lines]
    want = [r.get("epoch") for r in history]
    if epochs != want:
        return f"lists epochs {epochs} but the checkpoint's history has {want}"
    return "differs from the checkpoint's history"


def checkpoint_epoch(path: Path) -> int | None:
    """The ``epoch`` stored in a checkpoint file, or None when it is missing or unreadable."""
    try:
        return int(ckpt_io.load_file(path).get("epoch"))
    except (CheckpointError, TypeError, ValueError):
        return None


def history_of(state: Mapping[str, Any], run_dir: Path, path: Path, start_epoch: int) -> list[dict[str, Any]]:
    """The metric history of the checkpoint ``state`` read from ``path``; a checkpoint written before the
    history was kept in it takes the records before ``start_epoch`` from ``run_dir/metrics.jsonl``."""
    history = state.get("history")
    if history is None:  # a checkpoint written before the history was kept in it
        history = [r for r in read_metrics(run_dir / METRICS, path) if r.get("epoch", -1) < start_epoch]
    return [dict(r) for r in history]


def reconcile(run_dir: Path, state: Mapping[str, Any], path: Path, history: Sequence[Mapping[str, Any]],
              best_key: str | None, best_epoch: int | None) -> None:
    """Bring ckpt-best.pth in line with ``ckpt-last.pth`` (``state``, read from ``path``), the commit record of
    the last finished epoch, and say how metrics.jsonl differs from its history (the caller rewrites the
    views next; docs/RELIABILITY.md)."""
    epoch = int(state["epoch"])
    best_path = run_dir / "ckpt-best.pth"
    if best_key and best_epoch is not None:
        found = checkpoint_epoch(best_path)
        if found != best_epoch:
            if best_epoch == epoch:  # killed between the commit and the best copy
                log.warning("%s holds epoch %s but %s names epoch %d as the best; rewriting it from %s",
                            best_path, found, path, epoch, path)
                ckpt_io.atomic_save(dict(state), best_path)
            else:
                log.warning("%s holds epoch %s, not the best epoch %s named by %s; that checkpoint is lost, "
                            "the best metric is kept", best_path, found, best_epoch, path)
    metrics_file = run_dir / METRICS
    want = metrics_text(history)
    have = metrics_file.read_text(errors="replace") if metrics_file.exists() else None
    if have != want:
        reason = metrics_mismatch(have, history)
        log.warning("%s %s; rewriting it from %s (%d records up to epoch %d)", metrics_file, reason, path,
                    len(history), epoch)


def last_good_checkpoint(run_dir: Path, finite_loss: Callable[[Mapping[str, torch.Tensor]], bool] | None = None
                         ) -> tuple[Path, int] | None:
    """The newest checkpoint of ``run_dir`` whose weights are finite and, with ``finite_loss``, for whose
    weights ``finite_loss(weights)`` holds; ``(path, epoch)`` or None."""
    names = ["ckpt-last.pth", PREVIOUS] + sorted((p.name for p in run_dir.glob("ckpt-epoch-*.pth")),
                                                 reverse=True) + ["ckpt-best.pth"]
    candidates = []
    for name in names:
        path = run_dir / name
        try:
            state = ckpt_io.load_file(path)
            weights = ckpt_io.extract_state_dict(state, path)
        except ckpt_io.CheckpointError:
            continue
        candidates.append((int(state.get("epoch", -1)), path, weights))
    for ck_epoch, path, weights in sorted(candidates, key=lambda c: -c[0]):
        if not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
            continue
        if finite_loss is not None and not finite_loss(weights):
            continue
        return path, ck_epoch
    return None


def last_good_message(run_dir: Path, found: tuple[Path, int] | None, tested_batch: bool) -> str:
    """Name the checkpoint :func:`last_good_checkpoint` found (``tested_batch``: it was also probed on the
    failing batch), or say that there is none."""
    if found is None:
        written = sorted(p.name for p in run_dir.glob("ckpt-*.pth"))
        if not written:
            return "No checkpoint has been written yet (the failure is in the first epoch)."
        return (f"None of the checkpoints in {run_dir} ({', '.join(written)}) has finite weights and a "
                f"finite loss on this batch; start again rather than resuming.")
    path, ck_epoch = found
    tested = "finite weights and a finite loss on the failing batch" if tested_batch else "finite weights"
    hint = "" if path.name == "ckpt-last.pth" else f" (copy it to {run_dir / 'ckpt-last.pth'} to resume from it)"
    return f"The last good checkpoint is {path} (epoch {ck_epoch}: {tested}){hint}."
