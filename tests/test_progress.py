"""Progress display: a tqdm bar when stderr is a terminal, a few plain log lines when it is a file
(docs/RELIABILITY.md, promise 12)."""

from __future__ import annotations

import io
import logging
import re
import sys

from tests.test_reliability import Lin, cfg_of, data
from tools.engine import progress
from tools.engine.trainer import Trainer
from tools.engine.progress import EpochProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += self.step


def run(total: int, seconds_per_it: float, stream, caplog) -> list[str]:
    clock = Clock(seconds_per_it)
    bar = EpochProgress(total, "epoch 3", stream=stream, clock=clock)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tools.engine.progress"):
        for it in range(total):
            clock.tick()
            bar.update(**({"loss": f"{1.0 / (it + 1):.4g}"} if it % 5 == 0 else {}))
        bar.close()
    return [r.getMessage() for r in caplog.records if r.name == "tools.engine.progress"]


def test_a_file_gets_a_line_per_tenth_and_no_carriage_returns(caplog):
    stream = io.StringIO()
    lines = run(100, 1.0, stream, caplog)  # a 100 s epoch: lines at 30 s, 60 s, 90 s
    assert stream.getvalue() == ""
    assert lines == ["epoch 3: 30/100 it (30%), 1.00 it/s, eta 1m10s, loss=0.03846",
                     "epoch 3: 60/100 it (60%), 1.00 it/s, eta 40s, loss=0.01786",
                     "epoch 3: 90/100 it (90%), 1.00 it/s, eta 10s, loss=0.01163"]


def test_short_epochs_log_nothing_and_long_ones_at_least_every_ten_minutes(caplog):
    assert run(200, 0.1, io.StringIO(), caplog) == []  # a 20 s epoch
    lines = run(1000, 10.0, io.StringIO(), caplog)  # 10% = 1000 s > 600 s: a line every 600 s
    done = [int(re.match(r"epoch 3: (\d+)/1000", ln).group(1)) for ln in lines]
    assert done == list(range(60, 1000, 60))


def test_a_terminal_gets_the_bar_and_no_lines(caplog):
    stream = Terminal()
    lines = run(100, 1.0, stream, caplog)
    shown = stream.getvalue()
    assert lines == [] and "\r" in shown and "epoch 3:" in shown and "/100" in shown


def test_the_trainer_logs_lines_to_a_file_and_draws_the_bar_on_a_terminal(tmp_path, monkeypatch, caplog):
    def train(name):
        cfg = cfg_of("max_epoch=1", "log.progress_bar=true")
        Trainer(cfg, Lin(), data(8), tmp_path / name).fit()

    monkeypatch.setattr(progress, "MIN_INTERVAL_S", 0.0)  # a line per tenth even on this tiny epoch
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with caplog.at_level(logging.INFO, logger="tools.engine.progress"):
        train("file")
    assert err.getvalue() == ""
    assert [r.getMessage().split(",")[0] for r in caplog.records if r.name == "tools.engine.progress"] == \
        ["epoch 0: 1/4 it (25%)", "epoch 0: 2/4 it (50%)", "epoch 0: 3/4 it (75%)"]
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    caplog.clear()
    train("tty")
    assert "\r" in term.getvalue() and "epoch 0" in term.getvalue()
    assert not [r for r in caplog.records if r.name == "tools.engine.progress"]
