"""Mask strategies: which patches the student does not see.

A strategy is called as ``strategy(center, generator=g, epoch=e, scores=s)`` and returns a boolean
``(B, G)`` mask, True = masked, with exactly the same masked count in every sample. Everything is
vectorised on the centres' device and driven by an explicit ``torch.Generator``; no global RNG.

* ``random``: Point-MAE's ``rand`` masking, ``int(ratio * G)`` masked patches chosen uniformly.
* ``block``: Point-MAE's ``block`` masking, the ``int(ratio * G)`` centres nearest a random centre.
* ``gm3d``: GeoMask3D, see :class:`GM3DMask` (added with the GM3D objective).
"""

from __future__ import annotations

import torch

from utils.registry import Registry

MASKS = Registry("mask strategies")

__all__ = ["MASKS", "MaskStrategy", "RandomMask", "BlockMask", "uniform_noise", "mask_from_order"]


def uniform_noise(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None):
    """U(0, 1) noise drawn from ``generator`` (on its own device) and moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def mask_from_order(order: torch.Tensor, num_visible: int) -> torch.Tensor:
    """Mask everything but the first ``num_visible`` indices of each row of ``order`` (B, G)."""
    mask = torch.ones(order.shape, dtype=torch.bool, device=order.device)
    mask.scatter_(1, order[:, :num_visible], False)
    return mask


class MaskStrategy:
    """Base class. Args: ratio: fraction of patches to mask."""

    needs_scores = False

    def __init__(self, ratio: float = 0.6):
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
        self.ratio = ratio

    def num_masked(self, num_group: int) -> int:
        return int(self.ratio * num_group)

    def __call__(self, center: torch.Tensor, *, generator: torch.Generator | None = None, epoch: int = 0,
                 scores: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio})"


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
    """GeoMask3D easy-to-hard masking (SPEC section 4).

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

    def __init__(self, ratio: float = 0.6, alpha_max: float = 0.5, schedule: str = "linear",
                 total_epochs: int = 1):
        super().__init__(ratio)
        if not 0.0 <= alpha_max <= 1.0:
            raise ValueError(f"alpha_max must be in [0, 1], got {alpha_max}")
        curriculum_alpha(0, 1, alpha_max, schedule)  # validates the schedule name
        self.alpha_max, self.schedule, self.total_epochs = alpha_max, schedule, total_epochs

    def set_total_epochs(self, total_epochs: int) -> None:
        self.total_epochs = max(1, int(total_epochs))

    def num_masked(self, num_group: int) -> int:
        return num_group - int(num_group * (1 - self.ratio))

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
        return (f"GM3DMask(ratio={self.ratio}, alpha_max={self.alpha_max}, schedule={self.schedule!r}, "
                f"total_epochs={self.total_epochs})")
