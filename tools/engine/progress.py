"""The per-epoch progress display: a tqdm bar on a terminal, a few plain log lines otherwise.

A bar redrawn with carriage returns suits a terminal; written to a file (``nohup``, a batch job's log,
``2> err.txt``) every redraw stays in it, megabytes per epoch. So :class:`EpochProgress` draws the bar
only when its stream (stderr) is a terminal, and otherwise logs one line such as
``epoch 3: 120/480 it (25%), 2.10 it/s, eta 2m51s, loss=0.0123, lr=1.20e-04`` when both

* at least :data:`MIN_INTERVAL_S` seconds have passed since the epoch start or the previous line, and
* at least :data:`MIN_FRACTION` of the epoch has passed since then, or :data:`MAX_INTERVAL_S` seconds.

An epoch shorter than 30 s therefore logs no progress line (the epoch's summary line follows anyway); a
long one logs at most ten, and one at least every ten minutes.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import IO, Any

log = logging.getLogger(__name__)

__all__ = ["MAX_INTERVAL_S", "MIN_FRACTION", "MIN_INTERVAL_S", "EpochProgress"]

MIN_INTERVAL_S = 30.0
"""No two progress lines (or the epoch start and the first line) closer than this, in seconds."""
MIN_FRACTION = 0.1
"""A progress line once this share of the epoch has passed since the previous one ..."""
MAX_INTERVAL_S = 600.0
"""... or once this many seconds have."""


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class EpochProgress:
    """Progress of one epoch of ``total`` iterations, labelled ``desc`` (``epoch 3``).

    Args:
        total: iterations in the epoch.
        desc: the label.
        stream: where a bar would be drawn (default ``sys.stderr``); a bar is drawn only if it is a terminal.
        clock: the time source (``time.monotonic``; tests pass a fake one).
    """

    def __init__(self, total: int, desc: str, stream: IO[str] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.desc, self.clock = max(int(total), 0), desc, clock
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty()) if callable(isatty) else False
        self.bar = None
        if self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=self.stream)
        self.done = 0
        self.postfix: dict[str, Any] = {}
        self.start = self.last_time = clock()
        self.last_done = 0

    def update(self, n: int = 1, **postfix: Any) -> None:
        """``n`` more iterations done; ``postfix`` (e.g. ``loss=..., lr=...``) replaces the shown values."""
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(**postfix)
            self.bar.update(n)
            return
        self.done += n
        self.postfix.update(postfix)
        now = self.clock()
        since = now - self.last_time
        if self.done >= self.total or since < MIN_INTERVAL_S:
            return
        if self.done - self.last_done >= MIN_FRACTION * self.total or since >= MAX_INTERVAL_S:
            self.last_time, self.last_done = now, self.done
            log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        """The plain progress line at time ``now``."""
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        shown = "".join(f", {k}={v}" for k, v in self.postfix.items())
        eta_text = _duration(eta) if eta != float("inf") else "?"
        return (f"{self.desc}: {self.done}/{self.total} it ({pct:.0f}%), {rate:.2f} it/s, "
                f"eta {eta_text}{shown}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
