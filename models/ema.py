"""Weight averaging (model EMA) for any pre-training model (docs/EMA.md).

:class:`ModelEMA` keeps an exponential moving average of a model's weights in a
``torch.optim.swa_utils.AveragedModel``. The ``model_ema`` config section (:class:`ModelEMAConfig`) sets
the decay, its linear ramp over epochs (GM3D's teacher schedule), an optional warm-up, the update
interval and what happens to the BatchNorm running statistics.

The pieces GM3D's EMA teacher uses too live here, so that both averages follow one rule:

* :func:`ramp_decay`: the decay of an epoch (``start`` rising linearly to ``end`` over ``ramp_epochs``);
* :func:`warmup_decay`: the warm-up cap ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates;
* :func:`ema_update_`: one update of a list of averaged tensors towards the current ones
  (``torch._foreach_lerp_`` on floating-point tensors, a copy of integer ones).

Which module is averaged: the model's :meth:`averaged_module` when it has one (a GM3D model averages its
student, the plain backbone, so the averaged weights have the backbone's own pre-training keys), else the
whole model. The engine (``tools/engine/trainer.py``) builds the EMA after moving the model to its device,
updates it after every ``every``-th optimizer step, saves it in the checkpoint under ``model_ema`` and
scores its encoder with the linear SVM beside the student's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from utils.errors import ConfigError
from utils.registry import check_kwargs

__all__ = ["ModelEMAConfig", "ModelEMA", "build_model_ema", "ema_update_", "ramp_decay", "warmup_decay"]


def ramp_decay(epoch: int, start: float, end: float, ramp_epochs: int) -> float:
    """The EMA decay during ``epoch``: ``start`` rising linearly to ``end`` over ``ramp_epochs`` epochs,
    then ``end`` (GM3D's teacher schedule; ``ramp_epochs`` 0: ``end`` from the start)."""
    if epoch < ramp_epochs:
        return start + epoch / ramp_epochs * (end - start)
    return end


def warmup_decay(decay: float, num_updates: int) -> float:
    """``min(decay, (1 + n) / (10 + n))`` after ``n`` updates: early updates follow the model closely."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


@torch.no_grad()
def ema_update_(averaged: list[torch.Tensor], current: list[torch.Tensor], decay: float) -> None:
    """``a <- a + (1 - decay) (c - a)`` for the floating-point pairs (one ``_foreach_lerp_``), ``a <- c``
    for the others (integer buffers such as BatchNorm's ``num_batches_tracked``)."""
    lerp_a, lerp_c = [], []
    for a, c in zip(averaged, current, strict=True):
        if a.is_floating_point() or a.is_complex():
            lerp_a.append(a)
            lerp_c.append(c)
        else:
            a.copy_(c)
    if lerp_a:
        torch._foreach_lerp_(lerp_a, lerp_c, 1.0 - decay)


@dataclass
class ModelEMAConfig:
    """The ``model_ema`` section.

    Args:
        enabled: keep the average (off by default: the run is then exactly a run without this section).
        decay_start: decay at epoch 0.
        decay_end: decay after the ramp; null keeps ``decay_start`` for the whole run.
        ramp_epochs: epochs of the linear ramp from ``decay_start`` to ``decay_end`` (0: ``decay_end``
            from the first epoch).
        warmup: cap the decay at ``(1 + n) / (10 + n)`` after ``n`` updates, so that a short run's
            average does not keep much of the random initialisation.
        every: update after every ``every``-th optimizer step (counted over the whole run).
        bn: BatchNorm running statistics (every buffer) of the average: ``average`` (EMA-averaged like
            the weights; integer buffers copied) or ``copy`` (copied from the model at every update).
    """

    enabled: bool = False
    decay_start: float = 0.999
    decay_end: float | None = None
    ramp_epochs: int = 0
    warmup: bool = False
    every: int = 1
    bn: Literal["average", "copy"] = "average"

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "model_ema") -> ModelEMAConfig:
        d = dict(d or {})
        check_kwargs(cls, d, where)
        cfg = cls(**d)
        for key in ("decay_start", "decay_end"):
            v = getattr(cfg, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0):
                raise ConfigError(f"{where}.{key} = {v!r}; expected a number in [0, 1]")
        for key, low in (("ramp_epochs", 0), ("every", 1)):
            v = getattr(cfg, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"{where}.{key} = {v!r}; expected an integer >= {low}")
        if cfg.bn not in ("average", "copy"):
            raise ConfigError(f"{where}.bn = {cfg.bn!r}; expected one of average, copy")
        if not isinstance(cfg.enabled, bool) or not isinstance(cfg.warmup, bool):
            raise ConfigError(f"{where}.enabled and {where}.warmup must be true or false")
        return cfg


class ModelEMA(nn.Module):
    """An EMA of ``model``'s weights (of ``model.averaged_module()`` when the model defines it).

    The average starts as a copy of the model and its first update already averages (as GM3D's teacher:
    the ``AveragedModel`` counter starts at 1, so it never replaces the average by a plain copy). Call
    :meth:`set_epoch` at the start of each epoch and :meth:`update` after each optimizer step.
    """

    def __init__(self, model: nn.Module, cfg: ModelEMAConfig):
        super().__init__()
        self.cfg = cfg
        source = self.source_of(model)
        self.averaged = AveragedModel(source, multi_avg_fn=self._multi_avg, use_buffers=cfg.bn == "average")
        self.averaged.requires_grad_(False)
        self.averaged.n_averaged.fill_(1)  # counts updates + 1: the first update is an EMA step, not a copy
        self.epoch_decay = ramp_decay(0, *self._schedule())
        self._decay = self.epoch_decay

    @staticmethod
    def source_of(model: nn.Module) -> nn.Module:
        """The module whose weights are averaged."""
        pick = getattr(model, "averaged_module", None)
        return pick() if callable(pick) else model

    @property
    def module(self) -> nn.Module:
        """The averaged copy (same class and keys as the averaged module)."""
        return self.averaged.module

    @property
    def num_updates(self) -> int:
        return int(self.averaged.n_averaged) - 1

    def _schedule(self) -> tuple[float, float, int]:
        c = self.cfg
        end = c.decay_start if c.decay_end is None else c.decay_end
        return c.decay_start, end, c.ramp_epochs if c.decay_end is not None else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch_decay = ramp_decay(epoch, *self._schedule())

    def current_decay(self) -> float:
        """The decay of the next update."""
        return warmup_decay(self.epoch_decay, self.num_updates) if self.cfg.warmup else self.epoch_decay

    def _multi_avg(self, averaged, current, _n):
        ema_update_(averaged, current, self._decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights."""
        self._decay = self.current_decay()
        self.averaged.update_parameters(self.source_of(model))

    def ema_state(self) -> dict[str, torch.Tensor]:
        """The averaged module's state dict (the checkpoint's ``model_ema``)."""
        return self.module.state_dict()

    def load_ema_state(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        self.module.load_state_dict(state, strict=True)
        self.averaged.n_averaged.fill_(int(num_updates) + 1)


def build_model_ema(section: dict[str, Any] | None, model: nn.Module, where: str = "model_ema") -> ModelEMA | None:
    """A :class:`ModelEMA` of ``model`` when ``section`` enables it, else None (nothing is copied)."""
    cfg = ModelEMAConfig.from_dict(section, where)
    return ModelEMA(model, cfg) if cfg.enabled else None
