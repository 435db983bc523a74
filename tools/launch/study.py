"""Studies as data: load a study file (``cfgs/reproduce/*.yaml``), check it, expand it into runner jobs.

A study has rows (one pre-training each, per scale; a GM3D row names the row whose pre-training of the
same seed is its knowledge teacher), columns (one downstream job per row and seed: an entry point and,
per backbone and scale, a config with its args / opts), the seeds, the published numbers and per-scale
device-time estimates. :func:`load_study` checks the file's structure and raises one-line
:class:`~utils.errors.ConfigError` s that name the file and the key; :func:`expand` turns a selection
(scale, seeds, rows, columns) into :class:`tools.launch.jobs.Job` s whose ``meta`` is ``{row, column,
seed, scale}``; :func:`missing_data` lists the data sets a selection needs that are not on disk.

Job names: ``ROW/sSEED/pretrain`` and ``ROW/sSEED/COLUMN``. A GM3D row's teacher is the teacher row's
``pretrain`` job itself (one job, one folder), added even when that row is not selected. In a column's
args / opts, ``{seed}`` is the seed, ``{pretrain}`` the row's pre-training folder and ``{teacher}`` the
teacher's (both become the runner's ``{run:NAME}`` references, which make them dependencies).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from utils.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

SCALES = ("paper", "tiny")
KINDS = ("svm", "finetune", "fewshot", "segment")
ENTRIES = ("main_pretrain.py", "main_finetune.py", "segmentation/main.py", "tools/eval_svm.py")

#: The cells each kind of column gives (tools/launch/table.py reads them); the first is the headline.
CELLS: dict[str, tuple[str, ...]] = {
    "svm": ("acc",),
    "finetune": ("last", "best"),
    "finetune+vote": ("last", "best", "vote_mean", "vote_max"),
    "fewshot": ("last", "best"),
    "segment": ("miou_c_last", "miou_i_last", "miou_c_best", "miou_i_best"),
}
#: Where a published number goes when the study file names no cell: the selected-epoch cell.
DEFAULT_PAPER_CELL = {"svm": "acc", "finetune": "best", "fewshot": "best", "segment": "miou_i_best"}

#: Data set NAME -> the `tools/prepare_data.py layout` name and the folder docs/DATA.md gives it.
DATA_LAYOUTS = {
    "ShapeNet": ("shapenet", "data/ShapeNet55-34/"),
    "ModelNet": ("modelnet40", "data/ModelNet/modelnet40_normal_resampled/"),
    "ModelNetFewShot": ("modelnet-fewshot", "data/ModelNetFewshot/"),
    "ScanObjectNN": ("scanobjectnn", "data/ScanObjectNN/"),
    "ShapeNetPart": ("shapenetpart", "data/shapenetcore_partanno_segmentation_benchmark_v0_normal/"),
    "MeshFolder": ("mesh-folder", "data/MeshFolder/"),
}
DATA_PATH_KEYS = ("data_path", "pc_path", "root")

_TOP = {"name", "title", "seeds", "scales", "slurm", "backbones", "rows", "tiny_opts", "columns", "sources",
        "protocols", "paper", "estimates"}
_ROW = {"label", "backbone", "teacher", "pretrain"}
_COLUMN = {"label", "kind", "entry", "args", "configs", "opts", "tiny_opts", "result", "setting"}
_RESULT = {"svm": "svm.json", "finetune": "summary.json", "fewshot": "fewshot.json", "segment": "summary.json"}


@dataclass
class Study:
    """A loaded, checked study file (its sections as plain dicts)."""

    path: Path
    name: str
    title: str
    seeds: list[int]
    scales: dict[str, dict[str, Any]]
    slurm: dict[str, Any]
    backbones: dict[str, str]
    rows: dict[str, dict[str, Any]]
    columns: dict[str, dict[str, Any]]
    tiny_opts: dict[str, list[str]]
    sources: dict[str, str]
    protocols: dict[str, str]
    paper: dict[str, dict[str, dict[str, dict[str, Any]]]] = field(default_factory=dict)  # column -> cell -> row
    estimates: dict[str, dict[str, Any]] = field(default_factory=dict)

    def cells(self, column: str) -> tuple[str, ...]:
        """The table cells of ``column``, headline first."""
        c = self.columns[column]
        kind = c["kind"]
        if kind == "finetune" and "--vote" in c.get("args", []):
            kind = "finetune+vote"
        return CELLS[kind]

    def estimate(self, scale: str, row: str, column: str) -> tuple[float | None, str]:
        """Device seconds the study file gives for one job, and their provenance."""
        est = self.estimates.get(scale) or {}
        prov = str(est.get("provenance", "study file"))
        if column == "pretrain":
            value = (est.get("pretrain") or {}).get(row)
        else:
            value = (est.get("columns") or {}).get(column)
        return (float(value) if value is not None else None), prov


def _err(path: Path, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{path}: {key}: {msg}")


def _mapping(path: Path, key: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise _err(path, key, f"expected a mapping, got {type(value).__name__} {value!r}")
    return value


def _strings(path: Path, key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise _err(path, key, f"expected a list of strings, got {value!r}")
    return [str(v) for v in value]


def _unknown(path: Path, key: str, got: dict, allowed: set[str]) -> None:
    bad = sorted(set(got) - allowed)
    if bad:
        raise _err(path, f"{key}.{bad[0]}" if key else bad[0],
                   f"unknown key; expected one of {', '.join(sorted(allowed))}")


def load_study(path: str | os.PathLike[str]) -> Study:
    """Read and check a study file. Raises ConfigError (file and key named) on any structural problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file '{path}' does not exist (for example cfgs/reproduce/gm3d_tables.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    data = _mapping(path, "(top level)", data)
    _unknown(path, "", data, _TOP)
    for key in ("rows", "columns", "scales"):
        if not data.get(key):
            raise _err(path, key, "missing or empty")
    scales = _mapping(path, "scales", data["scales"])
    for s in scales:
        if s not in SCALES:
            raise _err(path, f"scales.{s}", f"unknown scale; expected one of {', '.join(SCALES)}")
        _unknown(path, f"scales.{s}", _mapping(path, f"scales.{s}", scales[s] or {}),
                 {"description", "check_data", "opts"})
    backbones = _mapping(path, "backbones", data.get("backbones") or {})
    tiny_opts = {k: _strings(path, f"tiny_opts.{k}", v)
                 for k, v in _mapping(path, "tiny_opts", data.get("tiny_opts") or {}).items()}
    rows = _mapping(path, "rows", data["rows"])
    for r, row in rows.items():
        key = f"rows.{r}"
        _unknown(path, key, _mapping(path, key, row), _ROW)
        if row.get("backbone") not in backbones:
            raise _err(path, f"{key}.backbone", f"{row.get('backbone')!r} is not one of backbones: "
                                                f"{', '.join(backbones) or '(none)'}")
        if row.get("teacher") is not None and row["teacher"] not in rows:
            raise _err(path, f"{key}.teacher", f"{row['teacher']!r} is not a row ({', '.join(rows)})")
        if row.get("teacher") == r:
            raise _err(path, f"{key}.teacher", "a row cannot be its own teacher")
        pre = _mapping(path, f"{key}.pretrain", row.get("pretrain"))
        for s, spec in pre.items():
            if s not in scales:
                raise _err(path, f"{key}.pretrain.{s}", f"unknown scale; the study has {', '.join(scales)}")
            spec = _mapping(path, f"{key}.pretrain.{s}", spec)
            _unknown(path, f"{key}.pretrain.{s}", spec, {"config", "opts", "args"})
            if not isinstance(spec.get("config"), str):
                raise _err(path, f"{key}.pretrain.{s}.config", "missing (a pre-training YAML)")
            _strings(path, f"{key}.pretrain.{s}.opts", spec.get("opts"))
    columns = _mapping(path, "columns", data["columns"])
    for c, col in columns.items():
        key = f"columns.{c}"
        _unknown(path, key, _mapping(path, key, col), _COLUMN)
        if col.get("kind") not in KINDS:
            raise _err(path, f"{key}.kind", f"{col.get('kind')!r}; expected one of {', '.join(KINDS)}")
        if col.get("entry") not in ENTRIES:
            raise _err(path, f"{key}.entry", f"{col.get('entry')!r}; expected one of {', '.join(ENTRIES)}")
        if col["kind"] == "fewshot" and not isinstance(col.get("setting"), str):
            raise _err(path, f"{key}.setting", "a few-shot column names its setting, e.g. '5-way 10-shot'")
        _strings(path, f"{key}.args", col.get("args"))
        configs = _mapping(path, f"{key}.configs", col.get("configs"))
        for b, per in configs.items():
            if b not in backbones:
                raise _err(path, f"{key}.configs.{b}", f"unknown backbone; expected one of {', '.join(backbones)}")
            for s in _mapping(path, f"{key}.configs.{b}", per):
                if s not in scales:
                    raise _err(path, f"{key}.configs.{b}.{s}", f"unknown scale; the study has {', '.join(scales)}")
        for s, opts in _mapping(path, f"{key}.opts", col.get("opts") or {}).items():
            if s not in scales:
                raise _err(path, f"{key}.opts.{s}", f"unknown scale; the study has {', '.join(scales)}")
            _strings(path, f"{key}.opts.{s}", opts)
        for g in _strings(path, f"{key}.tiny_opts", col.get("tiny_opts")):
            if g not in tiny_opts:
                raise _err(path, f"{key}.tiny_opts", f"{g!r} is not a tiny_opts group ({', '.join(tiny_opts)})")
    study = Study(path=path, name=str(data.get("name") or path.stem), title=str(data.get("title") or path.stem),
                  seeds=[int(s) for s in (data.get("seeds") or [0])], scales={k: v or {} for k, v in scales.items()},
                  slurm=dict(data.get("slurm") or {}), backbones=backbones, rows=rows, columns=columns,
                  tiny_opts=tiny_opts, sources=dict(data.get("sources") or {}),
                  protocols=dict(data.get("protocols") or {}), estimates=dict(data.get("estimates") or {}))
    study.paper = _paper(study, _mapping(path, "paper", data.get("paper") or {}))
    return study


def _paper(study: Study, paper: dict) -> dict:
    """``paper.COLUMN.ROW`` or ``paper.COLUMN.CELL.ROW`` -> column -> cell -> row -> entry, checked."""
    out: dict[str, dict[str, dict[str, dict]]] = {}
    for c, spec in paper.items():
        key = f"paper.{c}"
        if c not in study.columns:
            raise _err(study.path, key, f"unknown column; the study has {', '.join(study.columns)}")
        spec = _mapping(study.path, key, spec)
        cells = study.cells(c)
        if all(k in study.rows for k in spec):
            spec = {DEFAULT_PAPER_CELL[study.columns[c]["kind"]]: spec}
        for k in sorted(spec, key=lambda k: k in study.rows):  # report a key that is neither first
            if k not in cells:
                raise _err(study.path, f"{key}.{k}", f"neither a row nor a cell of this column ({', '.join(cells)})"
                           if k not in study.rows else "a column's numbers are given per row or per cell, not both")
        for cell, per_row in spec.items():
            if cell not in cells:
                raise _err(study.path, f"{key}.{cell}", f"neither a row nor a cell of this column ({', '.join(cells)})")
            for r, entry in _mapping(study.path, f"{key}.{cell}", per_row).items():
                if r not in study.rows:
                    raise _err(study.path, f"{key}.{cell}.{r}", f"unknown row; the study has {', '.join(study.rows)}")
                entry = _mapping(study.path, f"{key}.{cell}.{r}", entry)
                if not isinstance(entry.get("value"), (int, float)):
                    raise _err(study.path, f"{key}.{cell}.{r}.value", f"expected a number, got {entry.get('value')!r}")
                for ref, table in (("source", study.sources), ("protocol", study.protocols)):
                    if entry.get(ref) is not None and entry[ref] not in table:
                        raise _err(study.path, f"{key}.{cell}.{r}.{ref}", f"{entry[ref]!r} is not in {ref}s")
                out.setdefault(c, {}).setdefault(cell, {})[r] = dict(entry)
    return out


def _pick(study: Study, kind: str, wanted: list[str] | None, known: dict) -> list[str]:
    if not wanted:
        return list(known)
    for w in wanted:
        if w not in known:
            raise ConfigError(f"{study.path}: unknown {kind} '{w}'; the study has {', '.join(known)}")
    return list(dict.fromkeys(wanted))


def job_name(row: str, seed: int, column: str) -> str:
    return f"{row}/s{seed}/{column}"


def _fill(values: list[str], seed: int, pretrain: str | None, teacher: str | None) -> list[str]:
    subs = {"{seed}": str(seed)}
    if pretrain:
        subs["{pretrain}"] = "{run:" + pretrain + "}"
    if teacher:
        subs["{teacher}"] = "{run:" + teacher + "}"
    out = []
    for v in values:
        for a, b in subs.items():
            v = v.replace(a, b)
        out.append(v)
    return out


def _config_path(study: Study, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _err(study.path, key, "no config for this backbone and scale")
    if not (REPO / value).is_file():
        raise _err(study.path, key, f"config file '{value}' does not exist")
    return value


def expand(study: Study, scale: str, seeds: list[int] | None = None, rows: list[str] | None = None,
           columns: list[str] | None = None, gpus: int = 1, cpus: int = 1, pretrain_gpus: int | None = None) -> list:
    """The jobs of a selection, pre-trainings first (each on ``pretrain_gpus`` GPUs, default ``gpus``: the
    local executor runs a job on several GPUs through torchrun). Unknown scale / row / column, a missing config or a
    column without a config for a row's backbone: ConfigError naming the study file and key. A config
    given as null (``configs.BACKBONE.SCALE: null``) means no such job: the table shows the cell as n/a."""
    from tools.launch.jobs import Job

    if scale not in study.scales:
        raise ConfigError(f"{study.path}: unknown scale '{scale}'; the study has {', '.join(study.scales)}")
    seeds = list(seeds) if seeds else study.seeds
    row_ids = _pick(study, "row", rows, study.rows)
    col_ids = _pick(study, "column", columns, study.columns)
    scale_opts = _strings(study.path, f"scales.{scale}.opts", study.scales[scale].get("opts"))
    jobs: dict[str, Any] = {}

    def pretrain_job(r: str, seed: int) -> str:
        name = job_name(r, seed, "pretrain")
        if name in jobs:
            return name
        row = study.rows[r]
        spec = (row.get("pretrain") or {}).get(scale)
        key = f"rows.{r}.pretrain.{scale}"
        if spec is None:
            raise _err(study.path, key, "missing: this row has no pre-training at this scale")
        teacher = pretrain_job(row["teacher"], seed) if row.get("teacher") else None
        config = _config_path(study, f"{key}.config", spec.get("config"))
        est, _ = study.estimate(scale, r, "pretrain")
        jobs[name] = Job(name=name, entry="main_pretrain.py", config=config,
                         args=_fill(_strings(study.path, f"{key}.args", spec.get("args")), seed, None, teacher),
                         opts=_fill(_strings(study.path, f"{key}.opts", spec.get("opts")), seed, None, teacher)
                         + scale_opts,
                         folder_args=["--run_dir", "{self}"], result="summary.json", resume_from="ckpt-last.pth",
                         resume=["--resume"], gpus=pretrain_gpus or gpus, cpus=cpus, est_s=est,
                         meta={"row": r, "column": "pretrain", "seed": seed, "scale": scale})
        return name

    for seed in seeds:
        for r in row_ids:
            pretrain_job(r, seed)
    for seed in seeds:
        for r in row_ids:
            pre = job_name(r, seed, "pretrain")
            backbone = study.rows[r]["backbone"]
            for c in col_ids:
                col = study.columns[c]
                key = f"columns.{c}.configs.{backbone}.{scale}"
                per = (col.get("configs") or {}).get(backbone)
                if per is None:
                    raise _err(study.path, f"columns.{c}.configs.{backbone}", f"missing (row {r} has this backbone)")
                if scale in per and per[scale] is None:
                    continue  # the study says: no such column for this backbone at this scale (a cell "n/a")
                config = _config_path(study, key, per.get(scale))
                opts = _strings(study.path, f"columns.{c}.opts.{scale}", (col.get("opts") or {}).get(scale))
                if scale == "tiny":
                    for g in col.get("tiny_opts") or []:
                        opts = opts + study.tiny_opts[g]
                kind = col["kind"]
                name = job_name(r, seed, c)
                if kind == "svm":
                    folder_args, result, resume_from, resume = ["--json", "{self}/svm.json"], "svm.json", None, []
                elif kind == "fewshot":
                    folder_args, result, resume_from, resume = ["--run_dir", "{self}"], "fewshot.json", None, []
                else:
                    folder_args, result = ["--run_dir", "{self}"], "summary.json"
                    resume_from, resume = "ckpt-last.pth", ["--resume"]
                est, _ = study.estimate(scale, r, c)
                jobs[name] = Job(name=name, entry=col["entry"], config=config,
                                 args=_fill(_strings(study.path, f"columns.{c}.args", col.get("args")), seed, pre, None),
                                 opts=_fill(opts, seed, pre, None) + scale_opts, folder_args=folder_args,
                                 result=col.get("result") or result, resume_from=resume_from, resume=resume,
                                 gpus=gpus, cpus=cpus, est_s=est,
                                 meta={"row": r, "column": c, "seed": seed, "scale": scale})
    return list(jobs.values())


def _placeholder_free(values: list[str]) -> list[str]:
    """Overrides with ``{run:NAME}`` replaced by a dummy path (to resolve a config before anything ran)."""
    import re

    return [re.sub(r"\{run:[^}]*\}", "/nonexistent-run", v) for v in values]


def missing_data(jobs: list) -> list[str]:
    """One line per data set the jobs read that is not on disk: its name, the config key and where it goes
    (docs/DATA.md). Pre-training outputs of other jobs are not data and are not checked."""
    from datasets.build import dataset_kwargs
    from utils.config import load_config

    seen: dict[str, str] = {}
    for job in jobs:
        try:
            cfg = load_config(REPO / job.config, _placeholder_free(list(job.opts)))
        except ConfigError as e:
            raise ConfigError(f"job {job.name}: {e}") from None
        data_root = cfg.get("data_root")
        sections = cfg.get("dataset") or {}
        for split in ("train", "val", "test", "svm_train", "svm_test"):
            section = sections.get(split)
            if not section or not section.get("NAME"):
                continue
            flat = dataset_kwargs(section, data_root)
            for key in DATA_PATH_KEYS:
                value = flat.get(key)
                if not isinstance(value, str) or os.path.isabs(value) and os.path.exists(value):
                    continue
                path = value if os.path.isabs(value) else str(REPO / value)
                if os.path.exists(path) or value in seen:
                    continue
                layout, where = DATA_LAYOUTS.get(str(section["NAME"]), (None, None))
                hint = (f"put it at {where} under the repository (or set data_root=DIR for that layout under DIR); "
                        f"layout: docs/DATA.md, check with `python tools/prepare_data.py layout {layout} --root DIR`"
                        if layout else "layout: docs/DATA.md")
                seen[value] = (f"missing data set {section['NAME']}: {value} (dataset.{split}.{key} of {job.config}, "
                               f"needed by {job.name}); {hint}")
    return list(seen.values())
