"""``log.sync_every``: the engine reads no device value per iteration, yet logs the same metrics and still
names the first iteration with a non-finite loss (and blames bad data)."""

from __future__ import annotations

import pytest
import torch

from tests.test_reliability import Lin, NaNAt, cfg_of, data
from tools.engine.trainer import CUDA_SYNC_EVERY, NonFiniteLossError, Trainer
from utils.errors import ConfigError


def _fit(run, *opts, model=None, items=None):
    t = Trainer(cfg_of("total_bs=1", "max_epoch=2", *opts), model or Lin(), items or data(8), run)
    return t, t.fit()


def test_auto_is_every_step_on_cpu_and_sparse_on_cuda(tmp_path) -> None:
    t = Trainer(cfg_of("max_epoch=1"), Lin(), data(), tmp_path / "a")
    assert t.sync_every == 1 and CUDA_SYNC_EVERY > 1
    assert Trainer(cfg_of("max_epoch=1", "log.sync_every=5"), Lin(), data(), tmp_path / "b").sync_every == 5
    with pytest.raises(ConfigError, match=r"log.sync_every = 0 .* out of range; allowed: >= 1"):
        cfg_of("log.sync_every=0")


def test_sparse_reads_log_the_same_metrics(tmp_path) -> None:
    _, every = _fit(tmp_path / "every", "log.sync_every=1")
    _, sparse = _fit(tmp_path / "sparse", "log.sync_every=3")
    assert every["last"]["train/loss"] == sparse["last"]["train/loss"]  # same float64 sums, same order
    w1 = torch.load(tmp_path / "every" / "ckpt-last.pth", weights_only=True)["base_model"]["w"]
    w3 = torch.load(tmp_path / "sparse" / "ckpt-last.pth", weights_only=True)["base_model"]["w"]
    assert torch.equal(w1, w3)


def test_sparse_reads_name_the_first_bad_iteration(tmp_path) -> None:
    # 8 steps per epoch; the weights blow up after step 1, so iteration 2 is the first NaN; the check
    # after iteration 4 (sync_every 5) finds it.
    with pytest.raises(NonFiniteLossError) as e:
        _fit(tmp_path / "run", "log.sync_every=5", model=NaNAt(blow_at=1))
    msg = str(e.value)
    assert "non-finite loss nan at epoch 0, iteration 2 (found by the check after iteration 4" in msg
    assert "No checkpoint has been written yet" in msg and "lower optimizer.kwargs.lr" in msg
    assert "Set log.sync_every=1 to stop at the failing batch" in msg


def test_sparse_reads_blame_bad_data(tmp_path) -> None:
    items = data(8)
    items[6]["points"][0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError) as e:
        # total_bs=1, no shuffle effect on which item is bad: find it by the message, whichever iteration
        _fit(tmp_path / "run", "log.sync_every=4", items=items)
    msg = str(e.value)
    assert "The input batch is the cause" in msg and "lower optimizer.kwargs.lr" not in msg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_reads_every_fifty_steps_and_still_names_the_bad_iteration(tmp_path) -> None:
    t = Trainer(cfg_of("max_epoch=1", "total_bs=1"), NaNAt(blow_at=1), data(8), tmp_path / "run",
                device=torch.device("cuda"))
    assert t.sync_every == CUDA_SYNC_EVERY
    with pytest.raises(NonFiniteLossError, match=r"iteration 2 \(found by the check after iteration 7"):
        t.fit()


def test_cuda_bench_fails_clearly_without_cuda(capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    from bench.pretrain_step import main

    assert main(["--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err
