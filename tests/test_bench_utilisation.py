"""The pre-training benchmark's utilisation columns: FLOP counts against hand counts, and each row's share
of a matmul peak measured in the same round-robin."""

import re

import torch
from torch import nn

from bench.pretrain_step import MatmulPeak, count_flops, main


def test_cpu_attention_is_counted_forward_and_backward() -> None:
    # FlopCounterMode alone counts the CPU flash-attention kernel as zero; the bench registers it.
    B, H, L, E = 2, 3, 17, 8
    q, k, v = (torch.randn(B, H, L, E, requires_grad=True) for _ in range(3))
    one_matmul = 2 * B * H * L * L * E
    assert count_flops(lambda: nn.functional.scaled_dot_product_attention(q, k, v)) == 2 * one_matmul
    # backward: scores recomputed, then dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q
    total = count_flops(lambda: nn.functional.scaled_dot_product_attention(q, k, v).sum().backward())
    assert total == (2 + 5) * one_matmul


def test_linear_forward_and_backward_count() -> None:
    lin = nn.Linear(16, 32)
    x = torch.randn(10, 16, requires_grad=True)
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 10 * 16 * 32  # y, dX and dW


def test_matmul_peak_probe_counts_its_own_work() -> None:
    probe = MatmulPeak((64, 32, 48), "fp32", torch.device("cpu"))
    assert count_flops(probe) == probe.flops == 4 * 2 * 64 * 32 * 48


def test_quick_run_prints_utilisation_against_the_measured_peak(capsys) -> None:
    assert main(["--quick", "--configs", "quickstart", "--precisions", "fp32", "--threads", "1",
                 "--repeats", "1", "--warmup", "0", "--batch", "2"]) == 0
    out = capsys.readouterr()
    peak = re.search(r"fp32 matmul peak, in the same round-robin: 2048\^3 ([\d,]+) GFLOP/s", out.err)
    assert peak, out.err
    rows = [line for line in out.out.splitlines() if line.startswith("| quickstart |")]
    assert len(rows) == 2  # project and official formulation
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        gflop, rate, share = float(cells[9].replace(",", "")), float(cells[10].replace(",", "")), cells[11]
        ms = float(cells[6].replace(",", ""))
        assert gflop > 0 and abs(rate - gflop / (ms / 1e3)) <= 0.06 * rate + 0.05
        pct, peak_shown = re.fullmatch(r"(\d+) % \(([\d,]+)\)", share).groups()
        assert abs(int(pct) - 100 * rate / float(peak_shown.replace(",", ""))) <= 1
