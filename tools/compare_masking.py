"""Pre-train with random vs GeoMask3D masking (KD off and on) and compare linear-SVM accuracy.

For every seed, on the same config and epochs:
  * ``random``       Point-MAE, random masking;
  * ``gm3d``         GeoMask3D masking, no knowledge distillation (variant A: Chamfer x1000 + GC ranking);
  * ``gm3d+kd``      GeoMask3D variant C, whose frozen knowledge teacher is that seed's ``random`` run
                     (so this arm builds on a finished Point-MAE pre-training: its cost is counted
                     with the teacher's time included);
  * ``random (equal time)`` with ``--equal-time``: random masking trained for as many epochs as the
                     ``gm3d`` arm's wall-clock buys.
Every arm masks the same number of patches (``--count``, the masked-count rule of ``model.mask.count``:
``gm3d`` keeps ``int(G (1 - r))`` visible, ``point_mae`` masks ``int(r G)``), so the arms differ only in
which patches they hide. Each run is the real CLI (``main_pretrain.py``) in a subprocess. The table (mean ± std over seeds of
the last-epoch SVM accuracy, the best-epoch accuracy selected on the test split, and the wall-clock)
is printed and written to ``<out>/compare.md``.

    python tools/compare_masking.py --config cfgs/pretrain/quickstart.yaml --seeds 0 1 2 --out experiments/compare
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_arm(config: str, run_dir: Path, opts: list[str]) -> dict:
    """Run one pre-training (or reuse a finished one) and return its summary plus wall-clock."""
    summary_path = run_dir / "summary.json"
    timing_path = run_dir / "wallclock.json"
    if summary_path.exists() and timing_path.exists():
        return {**json.loads(summary_path.read_text()), **json.loads(timing_path.read_text())}
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    cmd = [sys.executable, str(REPO / "main_pretrain.py"), "--config", config, "--run_dir", str(run_dir),
           "log.progress_bar=false", "log.tensorboard=false", *opts]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"run failed ({run_dir}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    timing_path.write_text(json.dumps({"wall_s": wall}))
    return {**json.loads(summary_path.read_text()), "wall_s": wall}


def mean_std(xs: list[float]) -> str:
    """``"mean ± std"`` (sample std, ddof=1: :func:`tools.stats.mean_std`), or ``n/a`` for no values."""
    from tools.stats import mean_std as _mean_std

    if not xs:
        return "n/a"
    m, sd = _mean_std(xs)
    return f"{m:.2f} ± {sd:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="cfgs/pretrain/quickstart.yaml", help="Point-MAE pre-training config")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="experiments/compare_masking", help="folder for the runs and compare.md")
    p.add_argument("--jobs", type=int, default=1, help="seeds run in parallel (use threads=1 per run)")
    p.add_argument("--count", choices=["gm3d", "point_mae"], default="gm3d",
                   help="masked-count rule for every arm (model.mask.count), so all arms mask the same count")
    p.add_argument("--equal-time", action="store_true", help="add a random-masking arm given gm3d's wall-clock")
    p.add_argument("--gm3d", nargs="*", default=["model.gm3d.gc_decoder_depth=2", "model.gm3d.ema_decay_start=0.99",
                                                 "model.gm3d.ema_decay_end=0.995"],
                   help="overrides for both gm3d arms")
    p.add_argument("opts", nargs="*", help="overrides for every arm (e.g. max_epoch=10 dataset.train.partial=0.3)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gm3d_common = ["model.NAME=Point_MAE_GM3D", "model.transformer_config.mask_type=gm3d", *args.gm3d]
    def one_seed(seed: int) -> dict[str, dict]:
        common = [f"seed={seed}", f"model.mask.count={args.count}", *args.opts]
        res = {"random": run_arm(args.config, out / f"random_s{seed}", common)}
        res["gm3d (no KD)"] = run_arm(args.config, out / f"gm3d_s{seed}",
                                      [*common, *gm3d_common, "model.gm3d.variant=A"])
        teacher = out / f"random_s{seed}" / "ckpt-last.pth"
        c = run_arm(args.config, out / f"gm3d_kd_s{seed}",
                    [*common, *gm3d_common, "model.gm3d.variant=C", f"model.gm3d.teacher_ckpt={teacher}"])
        res["gm3d + KD (teacher = random run)"] = {**c, "wall_s_with_teacher": c["wall_s"] + res["random"]["wall_s"]}
        if args.equal_time:
            epochs = res["random"]["last_epoch"] + 1
            eq_epochs = max(epochs, round(epochs * res["gm3d (no KD)"]["wall_s"] / res["random"]["wall_s"]))
            res["random, equal time"] = run_arm(args.config, out / f"random_eqtime_s{seed}",
                                                [*common, f"max_epoch={eq_epochs}",
                                                 f"scheduler.kwargs.epochs={eq_epochs}"])
        return res

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        per_seed = list(pool.map(one_seed, args.seeds))
    results: dict[str, list[dict]] = {}
    for res in per_seed:
        for arm, r in res.items():
            results.setdefault(arm, []).append(r)

    from utils.config import load_config
    cfg = load_config(args.config, args.opts)
    lines = [
        f"Linear-SVM accuracy (%) on `{cfg.dataset.svm_test.get('NAME', '?')}` test split, mean ± std over "
        f"seeds {args.seeds}; `{args.config}` {' '.join(args.opts)}; {cfg.max_epoch} epochs; "
        f"masked-count rule `{args.count}` for every arm; "
        f"{platform.processor() or platform.machine()}, {cfg.threads or torch.get_num_threads()} thread(s) per run, "
        f"{args.jobs} run(s) at a time, {cfg.precision}.",
        "",
        "| arm | SVM last epoch | SVM best epoch (test-selected) | SVM random init | wall-clock per run (s) |",
        "|---|---|---|---|---|",
    ]
    for arm, rs in results.items():
        last = [r["last_value"] for r in rs if r.get("last_value") is not None]
        best = [r["best_value"] for r in rs if r.get("best_value") is not None]
        init = [r["init"]["init/svm_acc"] for r in rs if r.get("init")]
        wall = [r.get("wall_s_with_teacher", r["wall_s"]) for r in rs]
        note = " (incl. teacher)" if "wall_s_with_teacher" in rs[0] else ""
        lines.append(f"| {arm} | {mean_std(last)} | {mean_std(best)} | {mean_std(init)} | "
                     f"{statistics.mean(wall):.0f}{note} |")
    table = "\n".join(lines)
    (out / "compare.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
