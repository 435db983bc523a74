"""Mask strategies: which patches the student does not see.

A strategy is called as ``strategy(center, generator=g, epoch=e, scores=s)`` and returns a boolean
``(B, G)`` mask, True = masked, with exactly the same masked count in every sample. Everything is
vectorised on the centres' device and driven by an explicit ``torch.Generator``; no global RNG.

* ``random``: Point-MAE's ``rand`` masking, the masked patches chosen uniformly.
* ``block``: Point-MAE's ``block`` masking, the centres nearest a random centre.
* ``gm3d``: GeoMask3D, see :class:`GM3DMask`.

Everything about the mask has one home: the ``model.mask`` config block (:class:`MaskConfig`: strategy,
ratio, count rule, curriculum), built by :func:`build_mask`, and one function for the masked count,
:func:`num_masked`. The two official conventions differ and both are kept by name (``count``):

* ``point_mae``: ``int(ratio * G)`` patches masked (Point-MAE; 38 of 64 at ratio 0.6);
* ``gm3d``: ``int(G * (1 - ratio))`` patches kept, the rest masked (GM3D / HPM; 39 of 64).

Each strategy defaults to its paper's rule (``random`` / ``block``: ``point_mae``, ``gm3d``: ``gm3d``);
a comparison of strategies sets one rule for every arm so that all mask the same count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from utils.errors import ConfigError
from utils.registry import Registry, check_kwargs

MASKS = Registry("mask strategies")

__all__ = ["MASKS", "MaskStrategy", "RandomMask", "BlockMask", "GM3DMask", "MaskConfig", "build_mask",
           "num_masked", "COUNT_RULES", "uniform_noise", "mask_from_order"]

COUNT_RULES = ("point_mae", "gm3d")


def num_masked(num_group: int, ratio: float, rule: str) -> int:
    """Masked patches out of ``num_group`` at ``ratio`` under the named official convention."""
    if rule == "point_mae":
        return int(ratio * num_group)
    if rule == "gm3d":
        return num_group - int(num_group * (1 - ratio))
    raise ConfigError(f"unknown mask count rule {rule!r}; expected one of {', '.join(COUNT_RULES)}")


def uniform_noise(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None):
    """U(0, 1) noise drawn from ``generator`` (on its own device) and moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def mask_from_order(order: torch.Tensor, num_visible: int) -> torch.Tensor:
    """Mask everything but the first ``num_visible`` indices of each row of ``order`` (B, G)."""
    mask = torch.ones(order.shape, dtype=torch.bool, device=order.device)
    mask.scatter_(1, order[:, :num_visible], False)
    return mask



def check_masked_count(num_group: int, ratio: float, rule: str, *, ratio_key: str = "mask ratio",
                       group_key: str = "num_group") -> int:
    """The masked count of ``num_group`` patches at ``ratio`` under ``rule``; a ConfigError naming
    ``ratio_key`` / ``group_key`` (the keys the user set) unless at least one patch is masked and one
    stays visible, with the range of ratios (in steps of 0.001) that satisfies it."""
    masked = num_masked(num_group, ratio, rule)
    if 1 <= masked <= num_group - 1:
        return masked
    ok = [k / 1000 for k in range(1, 1000) if 1 <= num_masked(num_group, k / 1000, rule) <= num_group - 1]
    fix = (f"set {ratio_key} between {ok[0]:g} and {ok[-1]:g}" if ok
           else f"raise {group_key.split(' ')[0]} to at least 2")
    rule_text = {"point_mae": "int(ratio * G)", "gm3d": "G - int(G * (1 - ratio))"}.get(rule, rule)
    raise ConfigError(f"{ratio_key}={ratio:g} masks {masked} of the {num_group} patches ({group_key}={num_group}; "
                      f"{rule} count rule, {rule_text} masked): at least one patch must be masked and one "
                      f"visible; {fix}")

class MaskStrategy:
    """Base class.

    Args:
        ratio: fraction of patches to mask.
        count: masked-count rule (:func:`num_masked`); None = the strategy's own paper convention.
    """

    needs_scores = False
    default_count = "point_mae"

    def __init__(self, ratio: float = 0.6, count: str | None = None):
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
        self.ratio = ratio
        self.count = count or self.default_count
        num_masked(1, ratio, self.count)  # validates the rule name

    def num_masked(self, num_group: int) -> int:
        return num_masked(num_group, self.ratio, self.count)

    def num_selected(self, epoch: int, num_group: int) -> int:
        """Patches chosen by score at ``epoch`` (0 for strategies that use no scores)."""
        return 0

    def set_total_epochs(self, total_epochs: int) -> None:
        """The run's length (for curricula); ignored by strategies without one."""

    def __call__(self, center: torch.Tensor, *, generator: torch.Generator | None = None, epoch: int = 0,
                 scores: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio}, count={self.count!r})"


@MASKS.register("random", "rand")
class RandomMask(MaskStrategy):
    """Exactly ``int(ratio * G)`` patches masked uniformly at random per sample."""

    def __call__(self, center, *, generator=None, epoch=0, scores=None):
        B, G, _ = center.shape
        noise = uniform_noise((B, G), center.device, generator)
        order = noise.argsort(dim=1)
        return mask_from_order(order, G - self.num_masked(G))


@MASKS.register("block")
class BlockMask(MaskStrategy):
    """The ``int(ratio * G)`` centres nearest to one random centre per sample are masked."""

    def __call__(self, center, *, generator=None, epoch=0, scores=None):
        B, G, _ = center.shape
        seed_idx = (uniform_noise((B,), center.device, generator) * G).long().clamp_max(G - 1)
        seed = center.gather(1, seed_idx.view(B, 1, 1).expand(B, 1, 3))
        dist = (center - seed).square().sum(-1)                 # (B, G)
        order = dist.argsort(dim=1, descending=True, stable=True)  # farthest first = visible
        return mask_from_order(order, G - self.num_masked(G))


def curriculum_alpha(epoch: int, total_epochs: int, alpha_max: float, schedule: str = "linear") -> float:
    """Share of the masked patches chosen by GC score at ``epoch`` (0-based) of ``total_epochs``.

    ``linear``: ``(e + 1) / T * alpha_max`` (GM3D / HPM ``generate_mask``); ``mid``: reaches alpha_max at
    mid-training, ``min(2 (e + 1) / T * alpha_max, alpha_max)`` (GM3D's ``after_200_epoch`` option).
    Epochs past ``T`` (a model used beyond the length it was set up for) stay at ``alpha_max``.
    """
    if schedule == "linear":
        return min((epoch + 1) / total_epochs, 1.0) * alpha_max
    if schedule == "mid":
        return min(2 * (epoch + 1) / total_epochs * alpha_max, alpha_max)
    raise ValueError(f"unknown curriculum schedule '{schedule}'; expected 'linear' or 'mid'")


@MASKS.register("gm3d")
class GM3DMask(MaskStrategy):
    """GeoMask3D easy-to-hard masking (docs/METHOD.md, section 4.4).

    ``N_keep = int(G * (1 - ratio))`` patches stay visible, ``M = G - N_keep`` are masked (39 of 64 at
    ratio 0.6). At epoch ``e`` the ``N_sel = int(M * alpha_e)`` patches with the highest teacher GC
    scores are always masked; the other ``M - N_sel`` masked patches, and the visible ones, are uniform
    at random among the rest. ``N_sel = 0`` gives a fully random mask.

    Args:
        ratio: mask ratio r.
        alpha_max: final share of GC-selected patches.
        schedule: ``linear`` or ``mid`` (see :func:`curriculum_alpha`).
        total_epochs: T, set by the training loop (``set_total_epochs``).
    """

    needs_scores = True
    default_count = "gm3d"

    def __init__(self, ratio: float = 0.6, alpha_max: float = 0.5, schedule: str = "linear",
                 total_epochs: int = 1, count: str | None = None):
        super().__init__(ratio, count)
        if not 0.0 <= alpha_max <= 1.0:
            raise ValueError(f"alpha_max must be in [0, 1], got {alpha_max}")
        curriculum_alpha(0, 1, alpha_max, schedule)  # validates the schedule name
        self.alpha_max, self.schedule, self.total_epochs = alpha_max, schedule, total_epochs

    def set_total_epochs(self, total_epochs: int) -> None:
        self.total_epochs = max(1, int(total_epochs))

    def num_selected(self, epoch: int, num_group: int) -> int:
        """N_sel at ``epoch`` for ``num_group`` patches."""
        alpha = curriculum_alpha(epoch, self.total_epochs, self.alpha_max, self.schedule)
        return int(self.num_masked(num_group) * alpha)

    def __call__(self, center, *, generator=None, epoch=0, scores=None):
        B, G, _ = center.shape
        n_keep = G - self.num_masked(G)
        noise = uniform_noise((B, G), center.device, generator)
        n_sel = self.num_selected(epoch, G)
        if n_sel > 0:
            if scores is None:
                raise ValueError("gm3d masking needs the teacher's GC scores once N_sel > 0")
            top = scores.detach().float().topk(n_sel, dim=1).indices
            noise.scatter_(1, top, 2.0)  # sorted last: never among the visible ones
        return mask_from_order(noise.argsort(dim=1), n_keep)

    def __repr__(self) -> str:
        return (f"GM3DMask(ratio={self.ratio}, count={self.count!r}, alpha_max={self.alpha_max}, "
                f"schedule={self.schedule!r}, total_epochs={self.total_epochs})")


@dataclass
class MaskConfig:
    """The ``model.mask`` block: everything that decides which patches are hidden.

    Args:
        strategy: a registered strategy (``random``/``rand``, ``block``, ``gm3d``).
        ratio: mask ratio r.
        count: masked-count rule, ``point_mae`` or ``gm3d`` (None = the strategy's own convention).
        alpha_max: GM3D: final share of the masked patches chosen by GC score.
        curriculum: GM3D: ``linear`` over all epochs or ``mid`` (alpha_max at mid-training).
    """

    strategy: str = "rand"
    ratio: float = 0.6
    count: Literal["point_mae", "gm3d"] | None = None
    alpha_max: float = 0.5
    curriculum: Literal["linear", "mid"] = "linear"


def resolve_mask_config(mask: dict[str, Any] | None, transformer_config: dict[str, Any] | None, *,
                        where: str = "model", official_prefix: str = "transformer_config.") -> MaskConfig:
    """One :class:`MaskConfig` from the ``mask`` block and the official ``transformer_config`` keys.

    ``transformer_config.mask_ratio`` / ``mask_type`` are the official spellings of ``mask.ratio`` /
    ``mask.strategy``; either place may set them, and a disagreement is a :class:`ConfigError`.
    ``official_prefix`` is where the official keys live in the model's config (Point-M2AE: ``""``, its
    ``mask_ratio`` is a top-level model key), so that an error names the key the user set.
    """
    m = dict(mask or {})
    check_kwargs(MaskConfig, m, f"{where}.mask")
    tc = transformer_config or {}
    ratio_key = f"{where}.mask.ratio"
    for official, ours in (("mask_ratio", "ratio"), ("mask_type", "strategy")):
        if official in tc:
            if ours in m and m[ours] != tc[official]:
                raise ConfigError(f"{where}: {official_prefix}{official}={tc[official]!r} disagrees with "
                                  f"mask.{ours}={m[ours]!r}; set it in one place")
            m[ours] = tc[official]
            if official == "mask_ratio":
                ratio_key = f"{where}.{official_prefix}{official}"
    cfg = MaskConfig(**m)
    if cfg.strategy not in MASKS:
        raise ConfigError(f"{where}.mask.strategy: unknown mask strategy {cfg.strategy!r}; registered: "
                          f"{', '.join(MASKS.list())}")
    if not 0.0 < cfg.ratio < 1.0:
        raise ConfigError(f"{ratio_key}={cfg.ratio!r} is out of range; allowed: in (0, 1)")
    if cfg.count is not None and cfg.count not in COUNT_RULES:
        raise ConfigError(f"{where}.mask.count must be one of {', '.join(COUNT_RULES)} or null, got {cfg.count!r}")
    if not 0.0 <= cfg.alpha_max <= 1.0:
        raise ConfigError(f"{where}.mask.alpha_max must be in [0, 1], got {cfg.alpha_max}")
    return cfg


def build_mask(cfg: MaskConfig) -> MaskStrategy:
    """The strategy of a resolved :class:`MaskConfig`."""
    cls = MASKS.get(cfg.strategy)
    if cls is GM3DMask:
        return GM3DMask(cfg.ratio, alpha_max=cfg.alpha_max, schedule=cfg.curriculum, count=cfg.count)
    return cls(cfg.ratio, count=cfg.count)
