"""Optimizer parameter groups and the learning-rate schedules (plain functions)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from utils.errors import ConfigError


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim <= 1 or name.endswith(".bias") or "token" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Official rule: no decay for 1-D params, biases and anything named ``*token*``.

    Frozen parameters (``requires_grad=False``, e.g. a knowledge teacher) are left out.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if _no_decay(name, p):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


LAYER_DECAY_KEY = "optimizer.layer_decay"


def check_layer_decay(value: Any, where: str = LAYER_DECAY_KEY) -> float:
    """``optimizer.layer_decay`` as a float in (0, 1] (1 = off)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ConfigError(f"{where}: got {value!r}; expected a number in (0, 1] (1 = no layer-wise lr decay; "
                          f"the MAE / GM3D fine-tuning recipe uses 0.75)")
    return float(value)


def layer_scales(model: nn.Module, decay: float, where: str = LAYER_DECAY_KEY) -> dict[str, tuple[int, float]]:
    """``{parameter name: (layer, lr scale)}``: scale ``decay ** (L - layer)`` over the model's
    :meth:`~models.base.TrainHooks.lr_layers` (0 = embeddings, ``j + 1`` = block ``j``, ``L`` = norm and
    head, scale 1). A model that cannot place its parameters is a config error naming it and the key."""
    from models.base import TrainHooks

    name = type(model).__name__
    try:
        if not isinstance(model, TrainHooks):
            raise NotImplementedError(f"{name} is not a model of the backbone contract (models/base.py)")
        num_layers, layers = model.lr_layers()
    except NotImplementedError as e:
        detail = f" ({e})" if str(e) else ""
        raise ConfigError(f"{where} = {decay}: model {name} does not say which layer each parameter belongs to "
                          f"(lr_layers(), models/base.py){detail}; set {where}: 1.0 (off) for it") from None
    out = {}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = layers.get(pname)
        if layer is None or not 0 <= layer <= num_layers:
            raise ConfigError(f"{where}: model {name} gives parameter {pname} layer {layer}, outside 0..{num_layers}")
        out[pname] = (int(layer), decay ** (num_layers - int(layer)))
    return out


def layer_decay_groups(model: nn.Module, weight_decay: float, decay: float,
                       where: str = LAYER_DECAY_KEY) -> list[dict[str, Any]]:
    """Parameter groups for layer-wise lr decay: one per (layer, decay / no decay) that has parameters,
    in increasing layer, no-decay first; each carries ``lr_scale`` (which :func:`set_lr` multiplies into
    the schedule's lr) and ``layer``. The no-decay rule is :func:`param_groups`'s."""
    scales = layer_scales(model, decay, where)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for pname, p in model.named_parameters():
        if pname not in scales:
            continue
        layer, scale = scales[pname]
        nd = _no_decay(pname, p)
        g = groups.setdefault((layer, not nd), {"params": [], "weight_decay": 0.0 if nd else weight_decay,
                                                "lr_scale": scale, "layer": layer})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def _keep_scales(groups: list[dict[str, Any]]):
    """Optimizer post-load hook: the config's ``lr_scale`` / ``layer`` replace a checkpoint's (a resumed
    run keeps the scales of the config it runs, like every other optimizer setting of the config)."""
    want = [(g["lr_scale"], g["layer"]) for g in groups]

    def hook(optimizer: torch.optim.Optimizer) -> None:
        if len(optimizer.param_groups) != len(want):
            raise ConfigError(f"{LAYER_DECAY_KEY}: the loaded optimizer state has {len(optimizer.param_groups)} "
                              f"parameter groups, this config builds {len(want)}")
        for g, (scale, layer) in zip(optimizer.param_groups, want):
            g["lr_scale"], g["layer"] = scale, layer

    return hook


IMPLEMENTATIONS = ("auto", "fused", "foreach", "for-loop", "default")


def _impl_kwargs(impl: str, params: list[torch.Tensor]) -> dict[str, bool]:
    """torch's ``fused`` / ``foreach`` flags for ``optimizer.kwargs.implementation``.

    ``auto`` is ``fused`` when every parameter is a floating-point tensor on CPU or CUDA (one kernel
    per step instead of one per tensor; same update up to float rounding), else ``default``: torch's
    own choice (foreach on CUDA, the for-loop on CPU), which is what the official code runs.
    """
    if impl not in IMPLEMENTATIONS:
        raise ConfigError(f"optimizer.kwargs.implementation: unknown value '{impl}'; "
                          f"expected one of {', '.join(IMPLEMENTATIONS)}")
    if impl == "auto":
        ok = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) \
            and len({p.device for p in params}) == 1
        impl = "fused" if ok else "default"
    return {"fused": {"fused": True}, "foreach": {"foreach": True},
            "for-loop": {"foreach": False}}.get(impl, {})


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """``optimizer: {type: AdamW|Adam|SGD, layer_decay, kwargs: {lr, weight_decay, betas, momentum, implementation}}``.

    ``layer_decay`` (default 1 = off: the two groups of :func:`param_groups`) below 1 gives the
    parameters of layer ``i`` the lr scale ``layer_decay ** (L - i)`` (:func:`layer_decay_groups`).

    Build it after the model is on its device: ``implementation: auto`` looks at the parameters.
    """
    kind = cfg["type"]
    kw = dict(cfg.get("kwargs", {}))
    lr, wd = float(kw.pop("lr")), float(kw.pop("weight_decay", 0.0))
    decay = check_layer_decay(cfg.get("layer_decay", 1.0))
    if decay == 1.0:
        groups = param_groups(model, wd)
    else:
        groups = layer_decay_groups(model, wd, decay)
        for g in groups:
            g["lr"] = lr * g["lr_scale"]
    params = [p for g in groups for p in g["params"]]
    impl = _impl_kwargs(str(kw.get("implementation", "auto")), params)
    if kind == "AdamW":
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(kw.get("betas", (0.9, 0.999))), **impl)
    elif kind == "Adam":
        opt = torch.optim.Adam(groups, lr=lr, betas=tuple(kw.get("betas", (0.9, 0.999))), **impl)
    elif kind == "SGD":
        opt = torch.optim.SGD(groups, lr=lr, momentum=float(kw.get("momentum", 0.9)), nesterov=True, **impl)
    else:
        raise ConfigError(f"optimizer.type: unknown optimizer '{kind}'; expected AdamW, Adam or SGD")
    if decay != 1.0:
        opt.register_load_state_dict_post_hook(_keep_scales(opt.param_groups))
    return opt


CURVES = ("mae", "timm")


def timm_cosine_lr(t: float, base_lr: float, epochs: float, warmup: float, min_lr: float,
                   warmup_init: float) -> float:
    """timm 0.4.5 ``CosineLRScheduler`` (one cycle, ``warmup_prefix=False``) at step ``t``.

    The cosine runs over ``t / epochs`` from step 0 (not from the end of the warm-up); the linear
    warm-up from ``warmup_init`` only replaces its first ``warmup`` steps; from ``epochs`` on the rate
    is ``min_lr``. At step 150 of 300 (warm-up 10) this is exactly half-way: ``min_lr + (base - min_lr) / 2``.
    """
    if t < warmup:
        return warmup_init + t * (base_lr - warmup_init) / warmup
    if t >= epochs:
        return min_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t / epochs))


def lr_at(epoch_float: float, base_lr: float, sched: Mapping[str, Any]) -> float:
    """Learning rate at a fractional epoch (``epoch + iteration / iterations_per_epoch``).

    ``scheduler: {type: CosLR, kwargs: {epochs, initial_epochs, min_lr, warmup_lr_init, curve}}`` keeps
    the official keys; ``curve`` picks the shape (``type: constant`` keeps ``base_lr``):

    * ``mae`` (default): evaluated every iteration, linear warm-up over ``initial_epochs``, then a
      half-cosine over the remaining ``epochs - initial_epochs`` down to ``min_lr`` (MAE's / HPM's
      ``lr_sched``, which GeoMask3D's own pre-training uses).
    * ``timm``: the official Point-MAE / Point-M2AE runner: timm 0.4.5's cosine over ``epochs`` from
      epoch 0 (:func:`timm_cosine_lr`), stepped once per epoch at the end of the epoch, so epoch
      ``e >= 1`` trains at the rate of step ``e - 1`` and epoch 0 at ``warmup_lr_init``.
    """
    kind = sched.get("type", "CosLR")
    if kind == "constant":
        return base_lr
    if kind != "CosLR":
        raise ConfigError(f"scheduler.type: unknown scheduler '{kind}'; expected CosLR or constant")
    kw = sched.get("kwargs", {})
    total = float(kw.get("epochs", 300))
    warm = float(kw.get("initial_epochs", 10))
    min_lr = float(kw.get("min_lr", 1e-6))
    warm_init = float(kw.get("warmup_lr_init", 1e-6))
    curve = kw.get("curve", "mae")
    if curve == "timm":
        return timm_cosine_lr(max(math.floor(epoch_float) - 1, 0), base_lr, total, warm, min_lr, warm_init)
    if curve != "mae":
        raise ConfigError(f"scheduler.kwargs.curve: unknown value '{curve}'; expected one of {', '.join(CURVES)}")
    if epoch_float < warm:
        return warm_init + (base_lr - warm_init) * epoch_float / warm
    progress = min(1.0, (epoch_float - warm) / max(total - warm, 1e-8))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr = ``lr`` times its ``lr_scale`` (layer-wise decay; groups without one: ``lr``)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"] if "lr_scale" in g else lr
