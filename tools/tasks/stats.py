"""Small-sample statistics for reported accuracies: mean ± std and 95 % intervals.

* :func:`mean_std`: mean and **sample** standard deviation (``ddof=1``, the n - 1 denominator) of a few
  numbers (seeds, folds, repeats); 0 for a single value. This is the one std every summary prints.
* :func:`wilson_interval`: 95 % Wilson score interval of an accuracy measured on ``n`` test items (a
  binomial proportion; unlike the normal approximation it stays inside [0, 100] and is sensible at
  0 % / 100 % and for small ``n``).
* :func:`t_interval`: 95 % Student-t interval of a mean over a few runs (``mean ± t_{0.975, k-1} *
  std / sqrt(k)``); it describes run-to-run noise (seeds, re-sampling), not the test-set size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

__all__ = ["mean_std", "wilson_interval", "t_interval", "format_accuracy", "format_mean"]

Z95 = 1.959963984540054


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of a list of numbers; std 0 for one value."""
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
        raise ValueError("mean_std of an empty list")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def wilson_interval(accuracy: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval, in percent, of an accuracy (percent) measured on ``n`` items."""
    if n <= 0:
        raise ValueError(f"an accuracy needs at least one test item, got n={n}")
    p = min(max(accuracy / 100.0, 0.0), 1.0)
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def t_interval(values: Iterable[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of ``values`` (k >= 2; a single value gives (v, v))."""
    from scipy import stats

    a = np.asarray(list(values), dtype=np.float64)
    mean, sd = mean_std(a)
    if a.size < 2:
        return mean, mean
    half = float(stats.t.ppf(0.5 + level / 2, a.size - 1)) * sd / math.sqrt(a.size)
    return mean - half, mean + half


def format_accuracy(accuracy: float, n: int) -> str:
    """``"n=87 test items, 95 % interval 54.1-74.2 % (Wilson)"`` for one accuracy."""
    lo, hi = wilson_interval(accuracy, n)
    return f"n={n} test items, 95 % interval {lo:.1f}-{hi:.1f} % (Wilson)"


def format_mean(values: Iterable[float], what: str = "runs") -> str:
    """``"62.10 ± 1.20 % over 5 runs (std ddof=1), 95 % interval 60.6-63.6 % (t)"``."""
    a = list(values)
    m, s = mean_std(a)
    lo, hi = t_interval(a)
    return f"{m:.2f} ± {s:.2f} % over {len(a)} {what} (std ddof=1), 95 % interval {lo:.1f}-{hi:.1f} % (t)"
