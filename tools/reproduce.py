"""Reproduce a study's tables with one command (docs/REPRODUCE.md): pre-trainings, every downstream cell,
the table with the paper's numbers beside ours.

    python tools/reproduce.py --study cfgs/reproduce/gm3d_tables.yaml --scale tiny --seeds 0 --slots 2
    python tools/reproduce.py --study cfgs/reproduce/gm3d_tables.yaml --scale paper --seeds 0 1 2 --dry-run
    python tools/reproduce.py --study cfgs/reproduce/gm3d_tables.yaml --scale paper --executor slurm \\
        --partition gpu --gpus-per-job 1 --cpus 8 --mem-gb 64 --time-min 1440
    python tools/reproduce.py --study cfgs/reproduce/gm3d_tables.yaml --scale tiny --status

The study file (rows, columns, seeds, the published numbers) is expanded by ``tools/launch/study.py`` into
jobs of the runner (``tools/launch/graph.py``); state lives in the run folders under ``--out`` (default
``experiments/reproduce/<study stem>/``), so a killed launcher is started again with the same command and
finishes without re-running what finished, and ``--status`` works at any time. The table
(``table.md``, ``table.json``, ``table.csv``, ``table.png``) is rewritten after every finished job.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from utils.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger("reproduce")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="study file, e.g. cfgs/reproduce/gm3d_tables.yaml")
    p.add_argument("--scale", required=True, choices=("tiny", "paper"), help="tiny: generated data, minutes on a "
                   "CPU; paper: the paper's recipes and data sets")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the study file's)")
    p.add_argument("--rows", nargs="+", default=None, help="rows to run (default: all)")
    p.add_argument("--columns", nargs="+", default=None, help="columns to run (default: all)")
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--slots", type=int, default=None, help="local: jobs at a time (default: one per GPU, else 1)")
    p.add_argument("--pretrain-gpus", type=int, default=None, metavar="N",
                   help="GPUs of each pre-training job (local: torchrun --nproc_per_node N, data-parallel; slurm: "
                        "N GPUs per pre-training job); default one, or --gpus-per-job")
    p.add_argument("--out", default=None, help="study folder (default experiments/reproduce/<study stem>/)")
    p.add_argument("--dry-run", action="store_true", help="print every job, its dependencies and estimated "
                   "device time, and the total; run nothing")
    p.add_argument("--status", action="store_true", help="print every job's state and write the table; run nothing")
    g = p.add_argument_group("slurm (defaults: the study file's `slurm` section)")
    g.add_argument("--partition", default=None)
    g.add_argument("--gpus-per-job", type=int, default=None)
    g.add_argument("--cpus", type=int, default=None)
    g.add_argument("--mem-gb", type=float, default=None)
    g.add_argument("--time-min", type=int, default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--sbatch", nargs="*", default=[], metavar="KEY=VALUE", help="extra sbatch options")
    g.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                   help="submitit cluster (local: submitit's local executor, same code path, for tests)")
    return p.parse_args(argv)


def machine_line() -> str:
    from utils.misc import cpu_name

    cpu = cpu_name()
    load = "n/a"
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    return f"Machine: {cpu}, {os.cpu_count()} logical CPUs; load average {load} when this table was written."


def slurm_options(args: argparse.Namespace, defaults: dict) -> dict:
    extra = dict(defaults.get("sbatch") or {})
    for kv in args.sbatch:
        if "=" not in kv:
            raise ConfigError(f"--sbatch {kv!r}: expected KEY=VALUE")
        k, v = kv.split("=", 1)
        extra[k] = v

    def pick(name: str, key: str):
        v = getattr(args, name)
        return defaults.get(key) if v is None else v

    return {"partition": pick("partition", "partition"), "gpus_per_job": int(pick("gpus_per_job", "gpus_per_job") or 1),
            "cpus": int(pick("cpus", "cpus") or 8), "mem_gb": pick("mem_gb", "mem_gb"),
            "time_min": int(pick("time_min", "time_min") or 1440), "account": pick("account", "account"),
            "extra": extra}


def estimate(row: dict, study, scale: str) -> tuple[float | None, str]:
    """Device seconds of one planned job: a finished run of the same identity (its job.json wall_s) first,
    else the study file's figure."""
    from tools.launch.jobs import read_state

    folder = row["folder"]
    st = read_state(folder) if folder is not None else None
    if st and st.get("identity") == row["identity"] and st.get("state") == "done" and st.get("wall_s"):
        return float(st["wall_s"]), "measured (job.json)"
    job = row["job"]
    value, _ = study.estimate(scale, job.meta["row"], job.meta["column"])
    return value, "study file"


def fmt_s(s: float | None) -> str:
    if s is None:
        return "?"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.0f} s"


def dry_run(graph, study, scale: str, executor, slots: int) -> None:
    total, unknown, measured = 0.0, 0, 0
    plan = graph.plan()
    print(f"{len(plan)} jobs (scale {scale}); identities merge equal jobs (a GM3D row's teacher is the reference "
          f"row's pre-training)")
    for row in plan:
        est, src = estimate(row, study, scale)
        if est is None:
            unknown += 1
        else:
            total += est
            measured += src.startswith("measured")
        deps = ", ".join(row["deps"]) or "-"
        alias = f" (also {', '.join(row['aliases'])})" if row["aliases"] else ""
        print(f"- {row['name']}{alias}: {row['job'].entry} {row['job'].config}; after: {deps}; "
              f"est {fmt_s(est)} ({src}){'; ERROR ' + row['error'] if row['error'] else ''}")
        print(f"    {executor.describe(row['job']).replace(chr(10), chr(10) + '    ')}")
    prov = (study.estimates.get(scale) or {}).get("provenance", "")
    print(f"total estimated device time: {fmt_s(total)} ({total / 3600:.2f} device-hours; {measured} of "
          f"{len(plan)} jobs from finished runs, the others from the study file: {prov})"
          + (f"; {unknown} jobs without an estimate" if unknown else ""))
    if slots > 1 and scale == "tiny":
        print(f"  on {slots} local slots: about {fmt_s(total / slots)} of wall-clock if the slots stay busy")


def print_status(statuses: dict) -> None:
    counts: dict[str, int] = {}
    for name, st in statuses.items():
        counts[st.state] = counts.get(st.state, 0) + 1
        where = f" [{st.folder}]" if st.folder else ""
        line = f"{st.state:8s} {name}{where}"
        if st.wall_s:
            line += f" {st.wall_s:.0f} s"
        if st.error and st.state in ("failed", "blocked"):
            line += f"\n         error: {st.error.strip().splitlines()[-1]}"
        print(line)
    print("jobs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return _main(args)
    except (ConfigError, DataError) as e:
        log.error("%s: %s", type(e).__name__, e)
        return 2


def _main(args: argparse.Namespace) -> int:
    from tools.launch.graph import Graph
    from tools.launch.study import expand, load_study, missing_data
    from tools.launch.table import build_table, write_table

    study = load_study(args.study)
    seeds = args.seeds or study.seeds
    out = Path(args.out) if args.out else REPO / "experiments" / "reproduce" / Path(args.study).stem
    out = out.resolve()
    opts = slurm_options(args, study.slurm)
    gpus = opts["gpus_per_job"] if args.executor == "slurm" else 1
    jobs = expand(study, args.scale, seeds, args.rows, args.columns, gpus=gpus, pretrain_gpus=args.pretrain_gpus)
    if study.scales[args.scale].get("check_data", False) and not args.status:
        missing = missing_data(jobs)
        for line in missing:
            print(line, file=sys.stderr)
        if missing and not args.dry_run:
            print(f"{len(missing)} data set(s) missing: nothing was run or submitted (docs/DATA.md)", file=sys.stderr)
            return 2
        if missing:
            print(f"{len(missing)} data set(s) missing: a real run stops here (docs/DATA.md)", file=sys.stderr)
    graph = Graph(jobs, out)
    if args.executor == "slurm":
        from tools.launch.executors import SlurmExecutor

        executor = SlurmExecutor(out / "submitit", cluster=args.cluster, partition=opts["partition"],
                                 gpus_per_job=opts["gpus_per_job"], cpus=opts["cpus"], mem_gb=opts["mem_gb"],
                                 time_min=opts["time_min"], account=opts["account"], extra=opts["extra"])
    else:
        from tools.launch.executors import LocalExecutor

        executor = LocalExecutor(slots=args.slots)

    def table(statuses: dict) -> None:
        write_table(build_table(study, statuses, jobs, args.scale, seeds, out), out, machine_line())

    if args.dry_run:
        dry_run(graph, study, args.scale, executor, int(args.slots or 1))
        return 0
    if args.status:
        statuses = graph.status()
        print_status(statuses)
        table(statuses)
        print(f"table: {out / 'table.md'}")
        return 0
    t0 = time.time()

    def on_event(what: str, st) -> None:
        extra = f" ({st.wall_s:.0f} s)" if what == "done" and st.wall_s else ""
        extra += f": {st.error.strip().splitlines()[-1]}" if what == "failed" and st.error else ""
        log.info("%s %s%s", what, st.name, extra)

    table(graph.status())
    try:
        statuses = graph.run(executor, on_event=on_event, on_tick=table)
    finally:
        if hasattr(executor, "shutdown"):
            executor.shutdown()
    table(statuses)
    bad = [n for n, s in statuses.items() if s.state in ("failed", "blocked")]
    print_status(statuses)
    print(f"wall-clock {time.time() - t0:.0f} s; table: {out / 'table.md'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
