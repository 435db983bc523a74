"""The masking experiment: pre-train with every masking arm at equal masked count, then evaluate each.

Arms (``--arms``, default all but ``random_eqtime`` unless ``--equal-time``):

* ``random``         Point-MAE, random masking;
* ``block``          Point-MAE, block masking (a random seed patch and its nearest neighbours);
* ``gm3d_paper``     GeoMask3D as the paper specifies it (variant C: Chamfer + feature KD + GC ranking,
                     the GC transformer decoder at mask tokens, EMA teacher 0.999 -> 0.9999 over the first
                     quarter of the run, BatchNorm statistics averaged); its frozen knowledge teacher is
                     that seed's ``random`` run, so its cost includes the teacher's;
* ``gm3d_opts``      the same with the project's options (docs/METHOD.md): EMA BatchNorm statistics
                     copied, decay warm-up, z-scored GC target with a size-normalised Chamfer term, and
                     the content scorer (a PointNet on the patch's own points), EMA 0.99 -> 0.995;
* ``gm3d_position``  ``gm3d_opts`` with the position-only scorer (an MLP of the patch centre);
* ``gm3d_oracle``    ``gm3d_opts`` masking the patches with the largest true error (measured with extra
                     no-grad passes; an upper reference for what a scorer could reach, not a method);
* ``random_eqtime``  random masking trained for as many epochs as ``gm3d_opts``'s wall-clock buys.

``--ema`` adds weight averaging (the ``model_ema`` section, docs/EMA.md) at the paper teacher's schedule
(0.999 -> 0.9999 over the first quarter of the run, BatchNorm statistics averaged) to every arm but
``gm3d_paper``, whose EMA teacher already is that average; one run then gives the student and its average,
and the table adds the average's linear SVM (``model-EMA SVM``). ``--ema-decay START END`` changes the
schedule (for instance a slow average over ``gm3d_opts``, whose own teacher decays 0.99 -> 0.995).
``--finetune-source ARM=SOURCE`` fine-tunes that arm from ``student``, ``ema`` (the model EMA) or
``teacher`` (a GM3D run's EMA teacher); each source fine-tunes into its own folder.

Every arm masks the same number of patches (``--count``, the masked-count rule of ``model.mask.count``),
so the arms differ only in which patches they hide. Every run is a job of the project's runner
(``tools/launch``): the real CLI (``main_pretrain.py``, ``main_finetune.py``, ``tools/eval_svm.py``,
``tools/gc_probe.py``) in a subprocess, in ``<out>/<arm>_s<seed>`` and sub-folders of it; a finished run
of the same identity is reused, a killed one continues with ``--resume``, a failed one is reported with the
tail of its log while the other arms go on. Per arm and seed it records the linear
SVM of the student encoder (last epoch, and best epoch selected on the test split), optionally the SVM of
the EMA teacher's encoder (``--ema-svm``), fine-tuning accuracy (``--finetune CONFIG``), the content-shuffle
and rotation statistics of the scores (``--probe``, GM3D arms) and the wall-clock. The table (mean ± std over
seeds) is printed and written to ``<out>/compare.md``, every raw number to ``<out>/compare.json``.

    python tools/compare_masking.py --config cfgs/pretrain/quickstart.yaml --seeds 0 1 2 --jobs 2 \\
        --out experiments/compare_masking --equal-time --ema-svm --probe \\
        --finetune cfgs/finetune/quickstart_cls.yaml total_bs=4 max_epoch=20 threads=1

    # weight averaging against GM3D (docs/EMA.md): random + model EMA beside the paper's GM3D
    python tools/compare_masking.py --out experiments/ema_compare --arms random gm3d_paper --ema --ema-svm \
        --jobs 2 -- total_bs=4 max_epoch=20 scheduler.kwargs.epochs=20 scheduler.kwargs.initial_epochs=2 \
        optimizer.kwargs.lr=0.0005 eval.svm_every=10 threads=1
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # before torch loads the OpenMP runtime (utils/omp.py)
    from utils.omp import apply_wait_policy

    apply_wait_policy()

import torch  # noqa: E402

from tools.launch.executors import LocalExecutor  # noqa: E402
from tools.launch.graph import Graph  # noqa: E402
from tools.launch.jobs import Job  # noqa: E402

ARMS = ("random", "block", "gm3d_paper", "gm3d_opts", "gm3d_position", "gm3d_oracle", "random_eqtime")
def deps_of(arm: str, eqtime_fixed: bool = False) -> list[str]:
    """The arms whose run of the same seed ``arm`` needs: a GM3D arm's knowledge teacher is the ``random``
    run; ``random_eqtime`` takes its length from the ``random`` and ``gm3d_opts`` wall-clocks (from nothing
    when ``eqtime_fixed``: ``--eqtime-epochs`` gives it)."""
    if arm == "random_eqtime":
        return [] if eqtime_fixed else ["random", "gm3d_opts"]
    return ["random"] if arm.startswith("gm3d") else []


GM3D_OPTIONS = ["model.gm3d.ema_bn=copy", "model.gm3d.ema_warmup=true", "model.gm3d.gc_target=zscore",
                "model.gm3d.gc_chamfer_norm=true", "model.gm3d.ema_decay_start=0.99",
                "model.gm3d.ema_decay_end=0.995"]


def ema_overrides(epochs: int, start: float = 0.999, end: float = 0.9999) -> list[str]:
    """``model_ema`` at GM3D's paper-teacher schedule (``gm3d_paper``: the ramp spans a quarter of the run)."""
    return ["model_ema.enabled=true", f"model_ema.decay_start={start}", f"model_ema.decay_end={end}",
            f"model_ema.ramp_epochs={max(1, math.ceil(epochs / 4))}", "model_ema.bn=average"]


def train_seconds(run_dir: Path) -> float | None:
    """The summed training time of a run's epochs (``time_s`` of metrics.jsonl: no evaluation, no start-up)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return sum(float(r["time_s"]) for r in recs if r.get("epoch", -1) >= 0 and "time_s" in r)


def mean_std(xs: list[float]) -> str:
    """``"mean ± std"`` (sample std, ddof=1: :func:`tools.stats.mean_std`), or ``n/a`` for no values."""
    from tools.stats import mean_std as _mean_std

    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    m, sd = _mean_std(xs)
    return f"{m:.2f} ± {sd:.2f}"


def arm_overrides(arm: str, args, common: list[str], teacher: Path | str, epochs: int) -> list[str]:
    """The overrides of one arm (on top of ``common``)."""
    gm3d = ["model.NAME=Point_MAE_GM3D", "model.transformer_config.mask_type=gm3d", *args.gm3d]
    opts = [*gm3d, "model.gm3d.variant=C", f"model.gm3d.teacher_ckpt={teacher}", *GM3D_OPTIONS,
            f"model.gm3d.ema_ramp_epochs={epochs}"]
    return {
        "random": common,
        "block": [*common, "model.transformer_config.mask_type=block"],
        "gm3d_paper": [*common, *gm3d, "model.gm3d.variant=C", f"model.gm3d.teacher_ckpt={teacher}",
                       "model.gm3d.ema_decay_start=0.999", "model.gm3d.ema_decay_end=0.9999",
                       f"model.gm3d.ema_ramp_epochs={max(1, math.ceil(epochs / 4))}"],
        "gm3d_opts": [*common, *opts, "model.gm3d.gc_scorer=content"],
        "gm3d_position": [*common, *opts, "model.gm3d.gc_scorer=position"],
        "gm3d_oracle": [*common, *opts, "model.gm3d.gc_scorer=oracle"],
    }[arm]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="cfgs/pretrain/quickstart.yaml", help="Point-MAE pre-training config")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="experiments/compare_masking", help="folder for the runs and compare.md")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (use threads=1 per run)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=None, help="arms to run (default: all but "
                   "random_eqtime, which --equal-time adds)")
    p.add_argument("--count", choices=["gm3d", "point_mae"], default="gm3d",
                   help="masked-count rule for every arm (model.mask.count), so all arms mask the same count")
    p.add_argument("--equal-time", action="store_true", help="add a random arm given gm3d_opts' wall-clock")
    p.add_argument("--gm3d", nargs="*", default=["model.gm3d.gc_decoder_depth=2"],
                   help="overrides for every GM3D arm")
    p.add_argument("--finetune", default=None, metavar="CONFIG",
                   help="also fine-tune every arm's last checkpoint with this fine-tuning config")
    p.add_argument("--finetune-arms", nargs="+", choices=ARMS, default=None,
                   help="arms to fine-tune (default: every arm but random_eqtime)")
    p.add_argument("--eqtime-epochs", type=int, default=None,
                   help="epochs of random_eqtime (default: from the measured wall-clocks of gm3d_opts and random, "
                        "which a shared machine makes noisy; bench/masking_arms.py measures the step-time ratio)")
    p.add_argument("--finetune-opts", nargs="*", default=[],
                   help="overrides for the fine-tuning runs (their seed is the arm's)")
    p.add_argument("--ema-svm", action="store_true", help="also the linear SVM of GM3D arms' EMA-teacher encoder")
    p.add_argument("--ema", action="store_true",
                   help="weight averaging (model_ema) in every arm but gm3d_paper, at the paper teacher's schedule")
    p.add_argument("--ema-decay", type=float, nargs=2, default=(0.999, 0.9999), metavar=("START", "END"),
                   help="the --ema decay ramp (over the first quarter of the run)")
    p.add_argument("--finetune-source", nargs="*", default=[], metavar="ARM=SOURCE",
                   help="fine-tune ARM from student (default), ema (model_ema) or teacher (a GM3D EMA teacher)")
    p.add_argument("--probe", action="store_true",
                   help="also the content-shuffle and rotation statistics of GM3D arms' scores (tools/gc_probe.py)")
    p.add_argument("--probe-limit", type=int, default=32, help="shapes used by --probe")
    p.add_argument("--report", action="store_true",
                   help="run nothing: tabulate the runs and evaluations already finished in --out (an interrupted "
                        "experiment, or one still running); each row says how many seeds it has")
    p.add_argument("--no-train", action="store_true",
                   help="pre-train nothing: evaluate the runs that have finished (e.g. beside a running experiment)")
    p.add_argument("opts", nargs="*", help="overrides for every arm (e.g. max_epoch=20 total_bs=4 threads=1)")
    args = p.parse_args(argv)
    ft_source: dict[str, str] = {}
    for item in args.finetune_source:
        arm, _, src = item.partition("=")
        if arm not in ARMS or src not in ("student", "ema", "teacher"):
            p.error(f"--finetune-source {item!r}: expected ARM=SOURCE with ARM one of {', '.join(ARMS)} and "
                    f"SOURCE one of student, ema, teacher")
        ft_source[arm] = src
    fixed = args.eqtime_epochs is not None
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    from utils.config import load_config
    cfg = load_config(args.config, args.opts)
    epochs = int(cfg.max_epoch)
    jobs = build_jobs(args, out, epochs, ft_source, fixed)
    graph = Graph(jobs, out)
    if not args.report:
        only = (lambda name: graph.jobs[name].meta.get("step") != "pretrain") if args.no_train else None
        graph.run(LocalExecutor(slots=args.jobs), on_event=_print_event, only=only)
    status = graph.status()
    results = collect(graph, status, args, epochs)
    failed = [s for s in status.values() if s.state == "failed"]
    (out / "compare.json").write_text(json.dumps({"config": args.config, "opts": args.opts, "seeds": args.seeds,
                                                  "count": args.count, "results": results}, indent=1, default=str))
    table = format_table(results, args, cfg)
    if failed:
        table += "\n\nFailed runs (log tails in their job.log):\n" + "\n".join(
            f"- {s.name} ({s.folder}): {s.error}" for s in failed)
    (out / "compare.md").write_text(table + "\n")
    print(table)
    return 1 if failed else 0


LOG_OPTS = ["log.progress_bar=false", "log.tensorboard=false"]


def _print_event(what: str, st) -> None:
    if what == "start":
        print(f"start  {st.name}", flush=True)
    elif what == "done":
        print(f"done   {st.name} ({st.wall_s or 0:.0f} s)", flush=True)
    else:
        print(f"FAILED {st.name}: {st.error} (log: {st.folder}/job.log)", flush=True)


def _eqtime_prepare(epochs: int, seed: int, ema: list[float] | None):
    """``random_eqtime``'s length from the wall-clocks of the same seed's ``random`` and ``gm3d_opts`` runs."""
    def prepare(deps: Mapping[str, Any]) -> list[str]:
        rand, opt = deps[f"random_s{seed}"], deps[f"gm3d_opts_s{seed}"]
        eq = max(epochs, round(epochs * opt.wall_s / rand.wall_s))
        return [f"max_epoch={eq}", f"scheduler.kwargs.epochs={eq}", *(ema_overrides(eq, *ema) if ema else [])]
    return prepare


def build_jobs(args, out: Path, epochs: int, ft_source: dict[str, str], fixed: bool) -> list[Job]:
    """The experiment as runner jobs: per arm and seed a pre-training in ``<out>/<arm>_s<seed>``, and the
    evaluations asked for in sub-folders of it (``finetune[_SOURCE]``, ``ema_svm``, ``probe``)."""
    arms = set(args.arms or [a for a in ARMS if a != "random_eqtime"])
    if args.equal_time:
        arms.add("random_eqtime")
    arms |= {d for a in arms for d in deps_of(a, fixed)}
    threads = [o for o in args.opts if o.startswith("threads=")]
    jobs: list[Job] = []
    for arm in [a for a in ARMS if a in arms]:
        for seed in args.seeds:
            name = f"{arm}_s{seed}"
            common = [f"seed={seed}", f"model.mask.count={args.count}", *args.opts]
            if args.ema and arm not in ("gm3d_paper", "random_eqtime"):
                common = [*common, *ema_overrides(epochs, *args.ema_decay)]
            meta = {"arm": arm, "seed": seed, "step": "pretrain"}
            if arm == "random_eqtime":
                ema = list(args.ema_decay) if args.ema else None
                if fixed:
                    eq = args.eqtime_epochs
                    opts = [*common, f"max_epoch={eq}", f"scheduler.kwargs.epochs={eq}",
                            *(ema_overrides(eq, *ema) if ema else [])]
                    job = Job(name, "main_pretrain.py", args.config, opts=[*LOG_OPTS, *opts], run_dir=str(out / name),
                              meta={**meta, "epochs": eq})
                else:
                    job = Job(name, "main_pretrain.py", args.config, opts=[*LOG_OPTS, *common], run_dir=str(out / name),
                              after=[f"random_s{seed}", f"gm3d_opts_s{seed}"], meta=meta,
                              prepare=_eqtime_prepare(epochs, seed, ema))
            else:
                opts = arm_overrides(arm, args, common, f"{{run:random_s{seed}}}/ckpt-last.pth", epochs)
                job = Job(name, "main_pretrain.py", args.config, opts=[*LOG_OPTS, *opts], run_dir=str(out / name),
                          meta={**meta, "epochs": epochs})
            jobs.append(job)
            run = f"{{run:{name}}}"
            if args.finetune and arm in (args.finetune_arms or [a for a in ARMS if a != "random_eqtime"]):
                src = ft_source.get(arm, "student")
                opts = [f"seed={seed}", *threads, *args.finetune_opts, *([f"finetune.source={src}"] if src != "student"
                                                                          else [])]
                jobs.append(Job(f"{name}/finetune", "main_finetune.py", args.finetune,
                                args=["--finetune", f"{run}/ckpt-last.pth"], opts=[*LOG_OPTS, *opts],
                                run_dir=str(out / name / ("finetune" if src == "student" else f"finetune_{src}")),
                                meta={"arm": arm, "seed": seed, "step": "finetune", "source": src}))
            if args.ema_svm and arm.startswith("gm3d"):
                jobs.append(Job(f"{name}/ema_svm", "tools/eval_svm.py", f"{run}/config.yaml",
                                args=["--ckpt", f"{run}/ckpt-last.pth", "--source", "teacher"],
                                folder_args=["--json", "{self}/svm.json"], opts=threads, result="svm.json",
                                resume_from=None, run_dir=str(out / name / "ema_svm"),
                                meta={"arm": arm, "seed": seed, "step": "ema_svm"}))
            if args.probe and arm.startswith("gm3d"):
                jobs.append(Job(f"{name}/probe", "tools/gc_probe.py", None,
                                args=[f"{run}/ckpt-last.pth", "--diagnostics", "--limit", str(args.probe_limit)],
                                folder_args=["--json", "{self}/probe.json"], result="probe.json", resume_from=None,
                                run_dir=str(out / name / "probe"), meta={"arm": arm, "seed": seed, "step": "probe"}))
    return jobs


def _epochs_of(status) -> int | None:
    from tools.launch.jobs import read_state

    cmd = (read_state(status.folder) or {}).get("cmd") or []
    found = [int(c.split("=", 1)[1]) for c in cmd if c.startswith("max_epoch=")]
    return found[-1] if found else None


def collect(graph: Graph, status: dict, args, epochs: int) -> dict[str, list[dict]]:
    """Per arm, one record per finished seed: the pre-training summary, its wall-clock and the evaluations."""
    results: dict[str, list[dict]] = {}
    for name in graph.order:
        job = graph.jobs[name]
        if job.meta.get("step") != "pretrain" or status[name].state != "done":
            continue
        arm, seed = job.meta["arm"], job.meta["seed"]
        st = status[name]
        res: dict[str, Any] = {**(st.result or {}), "wall_s": st.wall_s, "opts": job.opts,
                               "epochs": _epochs_of(st) or epochs}
        if arm.startswith("gm3d") and status.get(f"random_s{seed}") and status[f"random_s{seed}"].wall_s:
            res["wall_s_with_teacher"] = st.wall_s + status[f"random_s{seed}"].wall_s
        ft = status.get(f"{name}/finetune")
        if ft is not None and ft.state == "done":
            res.update(ft_last=ft.result.get("last_value"), ft_best=ft.result.get("best_value"),
                       ft_source=graph.jobs[f"{name}/finetune"].meta["source"])
        res["model_ema_svm"] = (res.get("last") or {}).get("ema_svm_acc")
        res["train_s"] = train_seconds(st.folder)
        ema = status.get(f"{name}/ema_svm")
        if ema is not None:
            res["ema_svm"] = ema.result["svm_acc"] if ema.state == "done" else None
        probe = status.get(f"{name}/probe")
        if probe is not None:
            res["probe"] = probe.result if probe.state == "done" else None
        results.setdefault(arm, []).append(res)
    return {arm: results[arm] for arm in ARMS if arm in results}


def _probe_value(r: dict, key: str) -> float | None:
    """A diagnostic of ``tools/gc_probe.py --diagnostics --json`` (its first checkpoint), or None."""
    checkpoints = (r.get("probe") or {}).get("checkpoints") or [{}]
    value = (checkpoints[0].get("diagnostics") or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def format_table(results: dict[str, list[dict]], args, cfg) -> str:
    from utils.misc import cpu_name

    lines = [
        f"Linear-SVM and fine-tuning accuracy (%) on `{cfg.dataset.svm_test.get('NAME', '?')}`, mean ± std over "
        f"seeds {args.seeds}; `{args.config}` {' '.join(args.opts)}; {cfg.max_epoch} epochs at batch "
        f"{cfg.total_bs}; masked-count rule `{args.count}` for every arm; GM3D overrides {' '.join(args.gm3d)}; "
        f"{cpu_name()}, {cfg.threads or torch.get_num_threads()} thread(s) per run, "
        f"{args.jobs} run(s) at a time, {cfg.precision}. Best epoch = selected on the test split.",
        "",
        "| arm | seeds | SVM last | SVM best | EMA-teacher SVM | model-EMA SVM | fine-tune last | fine-tune best | "
        "shuffle rho | rotation rho | scores vs target rho (position baseline) | wall-clock per run (s) | "
        "training time per run (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, rs in results.items():
        wall = [r["wall_s"] for r in rs]
        with_t = [r["wall_s_with_teacher"] for r in rs if "wall_s_with_teacher" in r]
        wall_txt = f"{sum(wall) / len(wall):.0f}" + (f" ({sum(with_t) / len(with_t):.0f} with teacher)"
                                                    if with_t else "")
        if arm == "random_eqtime":
            wall_txt += f", {sum(r['epochs'] for r in rs) / len(rs):.0f} epochs"
        lines.append("| " + " | ".join([
            arm, str(len(rs)), mean_std([r.get("last_value") for r in rs]), mean_std([r.get("best_value") for r in rs]),
            mean_std([r.get("ema_svm") for r in rs]), mean_std([r.get("model_ema_svm") for r in rs]),
            mean_std([r.get("ft_last") for r in rs]) + "".join(sorted({f" ({r['ft_source']})" for r in rs
                                                                      if r.get("ft_source", "student") != "student"})),
            mean_std([r.get("ft_best") for r in rs]), mean_std([_probe_value(r, "shuffle_rho") for r in rs]),
            mean_std([_probe_value(r, "rotation_rho") for r in rs]),
            f"{mean_std([_probe_value(r, 'target_rho_heldout') for r in rs])} "
            f"({mean_std([_probe_value(r, 'position_baseline_rho') for r in rs])})", wall_txt,
            mean_std([r.get("train_s") for r in rs])]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
