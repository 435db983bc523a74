"""tools/reproduce.py and tools/launch/{study,table}.py: study validation and expansion, table numbers, the real
CLI end to end on tiny data, killed and restarted, and a failing cell."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY_DATA, run_cli, tiny_pretrain_cfg
from tests.helpers import child_env
from tools.launch.graph import Graph, JobStatus
from tools.launch.study import expand, load_study
from tools.launch.table import build_table, render_markdown
from utils.errors import ConfigError

STUDY = REPO / "cfgs/reproduce/gm3d_tables.yaml"
MODEL = {"trans_dim": 48, "depth": 1, "num_heads": 3, "group_size": 8, "num_group": 16, "encoder_dims": 48}


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_study(tmp: Path, corrupt: bool = False) -> Path:
    """A 1-row study on a 48-d, 1-block model: pre-training (1 epoch), a linear SVM and a 1-epoch fine-tune;
    ``corrupt`` adds a third column whose config is not valid YAML."""
    pre = _write(tmp / "pre.yaml", tiny_pretrain_cfg(max_epoch=1, eval={"svm_every": 0, "at_start": False},
                                                     scheduler={"kwargs": {"epochs": 1, "initial_epochs": 0}}))
    ft = _write(tmp / "ft.yaml", {
        "_base_": str(REPO / "cfgs/finetune/quickstart_cls.yaml"),
        "model": {**MODEL, "cls_dim": 4},
        "dataset": {"train": {**TINY_DATA, "subset": "train"}, "test": {**TINY_DATA, "subset": "test"}},
        "npoints": 128, "total_bs": 8, "max_epoch": 1, "threads": 1, "log": {"progress_bar": False},
        "scheduler": {"kwargs": {"epochs": 1, "initial_epochs": 0}}})
    columns = {
        "svm": {"label": "linear SVM", "kind": "svm", "entry": "tools/eval_svm.py",
                "args": ["--ckpt", "{pretrain}/ckpt-last.pth"], "configs": {"point_mae": {"tiny": str(pre)}},
                "opts": {"tiny": ["threads=1"]}},
        "cls": {"label": "fine-tune", "kind": "finetune", "entry": "main_finetune.py",
                "args": ["--finetune", "{pretrain}/ckpt-last.pth"], "configs": {"point_mae": {"tiny": str(ft)}},
                "opts": {"tiny": ["seed={seed}"]}},
    }
    if corrupt:
        bad = tmp / "corrupt.yaml"
        bad.write_text("model: {NAME: [unclosed\n")
        columns["broken"] = {**columns["cls"], "label": "corrupt", "configs": {"point_mae": {"tiny": str(bad)}}}
    study = {"name": "t", "title": "test study", "seeds": [0],
             "scales": {"tiny": {"opts": []}}, "backbones": {"point_mae": "Point-MAE"},
             "rows": {"point_mae": {"label": "Point-MAE", "backbone": "point_mae",
                                    "pretrain": {"tiny": {"config": str(pre), "opts": ["seed={seed}"]}}}},
             "columns": columns,
             "sources": {"s": "a source"}, "protocols": {"p": "best test epoch"},
             "paper": {"cls": {"point_mae": {"value": 90.0, "source": "s", "protocol": "p"}}}}
    return _write(tmp / ("study_bad.yaml" if corrupt else "study.yaml"), study)


# ------------------------------------------------------------------------------------------- study
def test_study_expansion_teacher_is_one_job_and_scan_variants_differ(tmp_path):
    study = load_study(STUDY)
    cols = ["svm_c001", "scan_objbg", "scan_objonly", "scan_hardest"]
    jobs = expand(study, "tiny", [0, 1], ["point_mae_gm3d"], cols)
    names = [j.name for j in jobs]
    # the teacher row's pre-training comes along even though that row is not selected
    assert names[:2] == ["point_mae/s0/pretrain", "point_mae_gm3d/s0/pretrain"]
    assert len(jobs) == 2 * (2 + len(cols))
    gm3d = next(j for j in jobs if j.name == "point_mae_gm3d/s1/pretrain")
    assert "model.gm3d.teacher_ckpt={run:point_mae/s1/pretrain}/ckpt-last.pth" in gm3d.opts
    assert gm3d.deps() == ["point_mae/s1/pretrain"] and "threads=1" in gm3d.opts
    svm = next(j for j in jobs if j.name == "point_mae_gm3d/s0/svm_c001")
    assert svm.meta == {"row": "point_mae_gm3d", "column": "svm_c001", "seed": 0, "scale": "tiny"}
    assert svm.folder_args == ["--json", "{self}/svm.json"] and svm.result == "svm.json" and "--C" in svm.args
    graph = Graph(jobs, tmp_path)
    scans = {graph.identity(f"point_mae_gm3d/s0/{c}") for c in cols[1:]}
    assert len(scans) == 3  # three distinct generated variants, not one merged job
    # a study that names the reference row too: its pre-training and the teacher are one job, one folder
    both = expand(study, "tiny", [0], ["point_mae_gm3d", "point_mae"], ["svm_c001"])
    assert sorted(j.name for j in both).count("point_mae/s0/pretrain") == 1
    assert len(both) == 4


@pytest.mark.parametrize("args, needle", [
    (["--rows", "nope"], "unknown row 'nope'"),
    (["--columns", "nope"], "unknown column 'nope'"),
])
def test_cli_bad_selection_is_one_line_exit_2(args, needle):
    r = run_cli(["tools/reproduce.py", "--study", str(STUDY), "--scale", "tiny", "--dry-run", *args])
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and str(STUDY) in r.stderr and "Traceback" not in r.stderr


def test_study_validation_errors(tmp_path):
    good = yaml.safe_load(tiny_study(tmp_path).read_text())

    def bad(mutate, needle):
        data = json.loads(json.dumps(good))
        mutate(data)
        path = _write(tmp_path / "bad.yaml", data)
        with pytest.raises(ConfigError) as e:
            study = load_study(path)
            expand(study, "tiny")
        assert str(path) in str(e.value) and needle in str(e.value), str(e.value)

    bad(lambda d: d["columns"]["svm"].update(kind="nope"), "columns.svm.kind")
    bad(lambda d: d["columns"]["svm"]["configs"]["point_mae"].update(tiny="cfgs/nope.yaml"),
        "columns.svm.configs.point_mae.tiny: config file 'cfgs/nope.yaml' does not exist")
    bad(lambda d: d["rows"]["point_mae"].update(teacher="ghost"), "rows.point_mae.teacher")
    bad(lambda d: d["rows"]["point_mae"]["pretrain"].update(huge={"config": "x"}), "rows.point_mae.pretrain.huge")
    bad(lambda d: d["paper"]["cls"].update(ghost={"value": 1}), "paper.cls.ghost")
    bad(lambda d: d.update(colums={}), "colums: unknown key")
    with pytest.raises(ConfigError, match="unknown scale 'paper'"):
        expand(load_study(tiny_study(tmp_path)), "paper")


# ------------------------------------------------------------------------------------------- table
def test_table_numbers_against_hand_computed(tmp_path):
    study = load_study(STUDY)
    jobs = expand(study, "tiny", [0, 1, 2], ["point_mae"], ["modelnet40", "fewshot_5w10s", "svm_c001"])
    ft = [{"last": {"test_acc": a}, "best_metric": "test_acc", "best_value": b, "test_acc_at_best": b,
           "vote_last_mean": vm, "vote_best_max": vx} for a, b, vm, vx in
          [(60.0, 62.0, 61.0, 64.0), (64.0, 65.0, 63.0, 66.0), (62.0, 66.0, 65.0, 69.0)]]
    fs = [{"5-way 10-shot": {"last": [70.0, 80.0], "best": [75.0, 85.0]}},
          {"5-way 10-shot": {"last": [90.0, 60.0], "best": [90.0, 70.0]}}]
    statuses = {}
    for j in jobs:
        m, st = j.meta, "pending"
        res = err = None
        if m["column"] == "modelnet40":
            st, res = "done", ft[m["seed"]]
        elif m["column"] == "fewshot_5w10s" and m["seed"] < 2:
            st, res = "done", fs[m["seed"]]
        elif m["column"] == "fewshot_5w10s":
            st = "running"
        elif m["column"] == "svm_c001":
            st, err = "failed", "line 1\nexit 2: ConfigError: bad value"
        elif m["column"] == "pretrain":
            st = "done"
        statuses[j.name] = JobStatus(j.name, st, error=err, result=res)
    table = build_table(study, statuses, jobs, "tiny", [0, 1, 2])
    cell = {(e["column"], e["cell"]): e for e in table["cells"]}
    last = cell[("modelnet40", "last")]
    assert last["n"] == 3 and last["mean"] == pytest.approx(62.0) and last["std"] == pytest.approx(2.0)
    assert cell[("modelnet40", "best")]["mean"] == pytest.approx((62 + 65 + 66) / 3)
    assert cell[("modelnet40", "vote_mean")]["std"] == pytest.approx(2.0)
    assert cell[("modelnet40", "vote_max")]["mean"] == pytest.approx((64 + 66 + 69) / 3)
    assert cell[("modelnet40", "vote_max")]["paper"]["value"] == 93.8
    few = cell[("fewshot_5w10s", "last")]  # 2 of 3 seeds done; their folds pooled: 70, 80, 90, 60
    assert few["n"] == 4 and few["mean"] == pytest.approx(75.0)
    assert few["std"] == pytest.approx((sum((v - 75.0) ** 2 for v in (70, 80, 90, 60)) / 3) ** 0.5)
    assert few["state"] == "partial"
    svm = cell[("svm_c001", "acc")]
    assert svm["state"] == "failed" and "mean" not in svm
    md = render_markdown(table)
    assert "62.00 ± 2.00 (n=3)" in md and "75.00 ± 12.91 (n=4), 1 of 3 seeds running" in md
    assert "failed: exit 2: ConfigError: bad value" in md


# -------------------------------------------------------------------------------------------- CLI
def _cli(study: Path, out: Path, *extra: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return run_cli(["tools/reproduce.py", "--study", str(study), "--scale", "tiny", "--slots", "2", "--out", str(out),
                    *extra], timeout=timeout)


def _states(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) | {"mtime": p.stat().st_mtime}
            for p in sorted((out / "runs").glob("*/job.json"))}


def test_end_to_end_killed_restarted_and_a_failing_cell(tmp_path):
    study = tiny_study(tmp_path)
    ref = tmp_path / "ref"
    r = _cli(study, ref)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = json.loads((ref / "table.json").read_text())
    cells = {(e["column"], e["cell"]): e for e in table["cells"]}
    assert set(cells) == {("svm", "acc"), ("cls", "last"), ("cls", "best")}
    assert all(e["state"] == "done" and e["n"] == 1 for e in cells.values())
    assert 0.0 <= cells[("cls", "last")]["mean"] <= 100.0
    assert cells[("cls", "best")]["paper"]["value"] == 90.0
    for f in ("table.md", "table.csv", "table.png"):
        assert (ref / f).stat().st_size > 0
    assert "90.00" in (ref / "table.md").read_text()

    # killed (SIGKILL to the launcher's process group) once the pre-training is done, then restarted
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "tools/reproduce.py", "--study", str(study), "--scale", "tiny",
                             "--slots", "2", "--out", str(out)], cwd=REPO, env=child_env(OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        states = _states(out) if (out / "runs").exists() else {}
        if any(s.get("name", "").endswith("pretrain") and s.get("state") == "done" for s in states.values()) and \
                any(s.get("state") == "running" for s in states.values()):
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {k: v for k, v in _states(out).items() if v["state"] == "done"}
    assert before, "the pre-training had not finished before the kill"
    status = _cli(study, out, "--status")
    assert status.returncode == 0 and "pretrain" in status.stdout
    r = _cli(study, out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after = _states(out)
    for k, v in before.items():  # finished jobs were not run again
        assert after[k]["attempts"] == v["attempts"] and after[k]["mtime"] == v["mtime"], k
    assert json.loads((out / "table.json").read_text()) == table

    # a corrupt config for one column: the other cells (reused from the reference run) stay computed
    bad = tiny_study(tmp_path, corrupt=True)
    r = _cli(bad, ref)
    assert r.returncode == 1
    status = _cli(bad, ref, "--status")
    assert "failed   point_mae/s0/broken" in status.stdout and "corrupt.yaml" in status.stdout
    md = (ref / "table.md").read_text()
    assert "failed:" in md and "corrupt.yaml" in md
    t2 = json.loads((ref / "table.json").read_text())
    done = {(e["column"], e["cell"]): e for e in t2["cells"] if e["state"] == "done"}
    assert set(done) == set(cells) and all(done[k]["mean"] == cells[k]["mean"] for k in cells)


def test_paper_dry_run_slurm_plan_and_missing_data(tmp_path):
    """--scale paper: every missing data set is named with its key and place before anything runs (exit 2);
    --dry-run still prints the plan, with the sbatch lines of --executor slurm and the total."""
    args = ["tools/reproduce.py", "--study", str(STUDY), "--scale", "paper", "--rows", "point_mae_gm3d",
            "--columns", "svm_c001", "--out", str(tmp_path / "o")]
    r = run_cli([*args, "--dry-run", "--executor", "slurm", "--partition", "gpu", "--sbatch", "qos=high",
                 "--pretrain-gpus", "2"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("#SBATCH --partition=gpu") == 3 and "#SBATCH --qos=high" in r.stdout
    # the two pre-trainings (the GM3D row's and its teacher's) on 2 GPUs each, the SVM job on 1
    assert r.stdout.count("#SBATCH --gpus-per-node=2") == 2 and r.stdout.count("#SBATCH --gpus-per-node=1") == 1
    assert "point_mae_gm3d/s0/pretrain" in r.stdout and "after: point_mae/s0/pretrain" in r.stdout
    assert "total estimated device time" in r.stdout
    if not (REPO / "data/ShapeNet55-34/ShapeNet-55").exists():
        assert "missing data set ShapeNet: data/ShapeNet55-34/ShapeNet-55 (dataset.train.data_path" in r.stderr
        r = run_cli(args)
        assert r.returncode == 2 and "nothing was run or submitted" in r.stderr
        assert not (tmp_path / "o" / "runs").exists()
