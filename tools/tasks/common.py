"""Helpers shared by the tasks: the evaluation loader and the evaluation-mode context."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.utils.data import DataLoader, Dataset

from tools.engine.trainer import collate_points

__all__ = ["eval_loader", "eval_mode"]


def eval_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    """The data set in order (no shuffle, no workers), collated like the engine's training batches."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate_points)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` inside the block; the model's previous training flag is restored after it."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)
