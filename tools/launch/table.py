"""The study's table, from the graph's statuses: every cell a mean ± std over seeds with n, beside the paper.

:func:`build_table` reads each done job's result file (through the statuses of
:meth:`tools.launch.graph.Graph.status`) into cells; :func:`write_table` writes ``table.md``,
``table.json``, ``table.csv`` and ``table.png`` into the study folder. A partial run gives a partial
table: cells of jobs that have not finished say ``pending`` (or ``running`` / ``blocked``), cells of a
failed job say ``failed`` with the job's error.

Cells per kind of column (the first one is the headline; none of it is selected on the test split unless
its label says so):

* ``svm``: the linear-SVM test accuracy of the last pre-training epoch's encoder;
* ``finetune``: the last epoch's test accuracy; the test-selected best epoch in its own cell; with
  voting, the mean over the vote repeats of the last-epoch model, and beside it the official statistic,
  the maximum over the repeats of the best-epoch model (both selected on the test split);
* ``fewshot``: the last epoch's query accuracy and the test-selected best epoch; the folds of every seed
  are pooled, so mean ± std and n are over all seed × fold runs;
* ``segment``: class and instance mIoU of the last epoch, and of the test-selected best epoch.

Std is the sample std (ddof=1; 0 for one value). Nothing here imports torch.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from tools.tasks.stats import mean_std

__all__ = ["build_table", "write_table", "render_markdown", "CELL_LABELS", "HEADLINES"]

CELL_LABELS = {
    "acc": "accuracy (last pre-training epoch)",
    "last": "last epoch",
    "best": "best epoch (selected on the test split)",
    "vote_mean": "vote, mean over repeats (last epoch)",
    "vote_max": "vote, max over repeats (best epoch; official, test-selected)",
    "miou_c_last": "class mIoU, last epoch",
    "miou_i_last": "instance mIoU, last epoch",
    "miou_c_best": "class mIoU, best epoch (test-selected)",
    "miou_i_best": "instance mIoU, best epoch (test-selected)",
}
#: Headline cells (one figure panel each) and the cell of the paper's number that belongs beside them.
HEADLINES = {"acc": "acc", "last": "best", "vote_mean": "vote_max", "miou_c_last": "miou_c_best",
             "miou_i_last": "miou_i_best"}


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def extract(kind: str, cell: str, result: Any, setting: str | None = None) -> list[float]:
    """The values one job contributes to one cell (a few-shot job: one per fold; else one or none)."""
    if not isinstance(result, dict):
        return []
    if kind == "svm":
        v = _num(result.get("svm_acc"))
        return [] if v is None else [v]
    if kind == "fewshot":
        r = result.get(setting) or {}
        return [float(v) for v in (r.get(cell) or []) if _num(v) is not None]
    if kind == "segment":
        metric = "test_" + cell.rsplit("_", 1)[0]           # miou_c_last -> test_miou_c
        src = (result.get("last") or {}) if cell.endswith("_last") else (result.get("at_best") or {})
        v = _num(src.get(metric))
        return [] if v is None else [v]
    if cell == "last":
        v = _num((result.get("last") or {}).get("test_acc"))
    elif cell == "best":
        v = _num(result.get("test_acc_at_best"))
        if v is None and result.get("best_metric") == "test_acc":
            v = _num(result.get("best_value"))
    elif cell == "vote_mean":
        v = _num(result.get("vote_last_mean", result.get("vote_last")))
    elif cell == "vote_max":
        v = _num(result.get("vote_best_max", result.get("vote_best")))
    else:
        v = None
    return [] if v is None else [v]


def build_table(study: Any, statuses: dict[str, Any], jobs: list, scale: str, seeds: list[int],
                out: Path | None = None) -> dict[str, Any]:
    """The table as plain data: ``rows``, ``columns`` (with their cells) and ``cells``, one per
    (column, cell, row), each with ``mean``, ``std``, ``n``, per-seed ``values``, ``state`` (done,
    partial, pending, running, blocked, failed), ``errors`` and the paper's number where one matches."""
    by_key: dict[tuple[str, str, int], Any] = {}
    for job in jobs:
        m = job.meta
        if m.get("column") != "pretrain":
            by_key[(m["row"], m["column"], int(m["seed"]))] = job
    rows = list(dict.fromkeys(j.meta["row"] for j in jobs if j.meta.get("column") != "pretrain"))
    columns = list(dict.fromkeys(j.meta["column"] for j in jobs if j.meta.get("column") != "pretrain"))
    pre_state = {(j.meta["row"], int(j.meta["seed"])): statuses.get(j.name) for j in jobs
                 if j.meta.get("column") == "pretrain"}
    cells = []
    for c in columns:
        col = study.columns[c]
        for cell in study.cells(c):
            for r in rows:
                values: dict[str, list[float]] = {}
                states: dict[str, str] = {}
                errors: dict[str, str] = {}
                folders: dict[str, str] = {}
                for seed in seeds:
                    job = by_key.get((r, c, seed))
                    if job is None:
                        continue
                    st = statuses.get(job.name)
                    state = st.state if st is not None else "pending"
                    states[str(seed)] = state
                    if st is not None and st.folder is not None:
                        folders[str(seed)] = (str(Path(st.folder).relative_to(out)) if out is not None
                                              and Path(st.folder).is_relative_to(out) else str(st.folder))
                    if state == "done":
                        vals = extract(col["kind"], cell, st.result, col.get("setting"))
                        if vals:
                            values[str(seed)] = vals
                        else:
                            errors[str(seed)] = f"{job.result} holds no value for this cell"
                    elif state in ("failed", "blocked") and st is not None:
                        pst = pre_state.get((r, seed))
                        why = st.error or ""
                        if state == "blocked" and pst is not None and pst.state == "failed":
                            why = f"pre-training failed: {pst.error}"
                        errors[str(seed)] = _one_line(why) or state
                pooled = [v for vs in values.values() for v in vs]
                entry: dict[str, Any] = {"column": c, "cell": cell, "row": r, "label": CELL_LABELS.get(cell, cell),
                                         "values": values, "states": states, "errors": errors, "folders": folders,
                                         "n": len(pooled), "seeds_done": len(values), "seeds": len(states)}
                if pooled:
                    entry["mean"], entry["std"] = mean_std(pooled)
                entry["state"] = _cell_state(states, values)
                paper = (study.paper.get(c) or {}).get(cell, {}).get(r)
                if paper:
                    entry["paper"] = {**paper, "source_text": study.sources.get(paper.get("source"), ""),
                                      "protocol_text": study.protocols.get(paper.get("protocol"), "")}
                cells.append(entry)
    return {"study": study.name, "title": study.title, "scale": scale, "seeds": list(seeds),
            "rows": [{"id": r, "label": study.rows[r]["label"]} for r in rows],
            "columns": [{"id": c, "label": study.columns[c]["label"], "kind": study.columns[c]["kind"],
                         "cells": list(study.cells(c))} for c in columns],
            "fewshot_pooling": "few-shot cells pool the folds of every seed: mean ± std (ddof=1) over all "
                               "seed x fold runs, n = seeds x folds",
            "cells": cells}


def _one_line(text: str) -> str:
    lines = [x.strip() for x in str(text).splitlines() if x.strip()]
    return lines[-1][:300] if lines else ""


def _cell_state(states: dict[str, str], values: dict[str, list[float]]) -> str:
    if not states:
        return "n/a"  # no job of this row for this column (no config for its backbone at this scale)
    if len(values) == len(states):
        return "done"
    if values:
        return "partial"
    for s in ("failed", "blocked", "running", "partial"):
        if s in states.values():
            return "running" if s == "partial" else s
    return "pending"


def format_cell(entry: dict[str, Any]) -> str:
    """``63.12 ± 1.20 (n=2)`` (one value: ``63.12 (n=1)``, no std); a cell with missing seeds says so; one
    without values gives its state."""
    if "mean" in entry:
        spread = f" ± {entry['std']:.2f}" if entry["n"] > 1 else ""
        text = f"{entry['mean']:.2f}{spread} (n={entry['n']})"
        missing = entry["seeds"] - entry["seeds_done"]
        if missing:
            text += f", {missing} of {entry['seeds']} seeds {_missing_word(entry)}"
        return text
    state = entry["state"]
    if state in ("failed", "blocked"):
        err = next(iter(entry["errors"].values()), "")
        return f"{state}: {err}" if err else state
    return state


def _missing_word(entry: dict[str, Any]) -> str:
    missing = [s for s in entry["states"] if s not in entry["values"]]
    kinds = sorted({entry["states"][s] for s in missing})
    return "/".join(kinds) or "pending"


def format_paper(entry: dict[str, Any]) -> str:
    p = entry.get("paper")
    if not p:
        return ""
    text = f"{p['value']:.2f}" + (f" ± {p['std']:.1f}" if p.get("std") is not None else "")
    if p.get("verified") is False:
        text += " (unverified)"
    return text


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(table: dict[str, Any], machine: str | None = None) -> str:
    """``table.md``: one line per (column, cell), ours and the paper's number per row."""
    rows = table["rows"]
    out = [f"# {table['title']}", "",
           f"Study `{table['study']}`, scale `{table['scale']}`, seeds {', '.join(map(str, table['seeds']))}. "
           "Each cell: mean ± sample std (ddof=1) over seeds, with n. The last epoch is the headline; lines "
           "marked *test-selected* pick an epoch or a vote repeat on the test split (the official protocol). "
           f"{table['fewshot_pooling'][0].upper()}{table['fewshot_pooling'][1:]}."]
    if table["scale"] == "tiny":
        out.append("")
        out.append("Tiny scale: generated data and minimal schedules; these numbers check the machinery, not "
                   "the method, and do not compare with the paper's.")
    if machine:
        out += ["", machine]
    header = "| column | cell | " + " | ".join(f"{_md(r['label'])} | paper" for r in rows) + " |"
    out += ["", header, "|" + "---|" * (2 + 2 * len(rows))]
    index = {(e["column"], e["cell"], e["row"]): e for e in table["cells"]}
    for col in table["columns"]:
        for i, cell in enumerate(col["cells"]):
            parts = [_md(col["label"]) if i == 0 else "", _md(CELL_LABELS.get(cell, cell))]
            for r in rows:
                e = index.get((col["id"], cell, r["id"]))
                parts += [_md(format_cell(e)) if e else "", _md(format_paper(e)) if e else ""]
            out.append("| " + " | ".join(parts) + " |")
    notes = []
    for e in table["cells"]:
        p = e.get("paper")
        if p:
            extra = "; ".join(x for x in (p.get("note"), "not verified against its source"
                                          if p.get("verified") is False else None) if x)
            src = p.get("source_text") or p.get("source")
            proto = p.get("protocol_text") or p.get("protocol")
            notes.append(f"- {e['column']} / {e['cell']} / {e['row']}: {p['value']} from {src}; {proto}"
                         + (f" ({extra})" if extra else ""))
    if notes:
        out += ["", "## Where the paper's numbers come from", "", *notes]
    fails = [e for e in table["cells"] if e["errors"]]
    if fails:
        out += ["", "## Errors", ""]
        seen = set()
        for e in fails:
            for seed, err in e["errors"].items():
                key = (e["column"], e["row"], seed, err)
                if key not in seen:
                    seen.add(key)
                    out.append(f"- {e['row']} / {e['column']} / seed {seed}: {_md(err)}")
    return "\n".join(out) + "\n"


def render_csv(table: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["column", "cell", "row", "mean", "std", "n", "state", "paper", "paper_std", "paper_source",
                "paper_protocol", "error"])
    for e in table["cells"]:
        p = e.get("paper") or {}
        w.writerow([e["column"], e["cell"], e["row"], _fmt(e.get("mean")), _fmt(e.get("std")), e["n"], e["state"],
                    p.get("value", ""), p.get("std", ""), p.get("source", ""), p.get("protocol", ""),
                    "; ".join(e["errors"].values())])
    return buf.getvalue()


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def render_figure(table: dict[str, Any], path: Path) -> None:
    """``table.png``: one panel per headline cell of every column, a bar per row with its std, the paper's
    number (of the matching test-selected protocol) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = {(e["column"], e["cell"], e["row"]): e for e in table["cells"]}
    panels = [(col, cell) for col in table["columns"] for cell in col["cells"] if cell in HEADLINES]
    if not panels:
        return
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    labels = [r["label"] for r in table["rows"]]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (col, cell) in zip(axes.flat, panels, strict=False):
        xs = range(len(table["rows"]))
        for x, r in zip(xs, table["rows"], strict=True):
            e = index.get((col["id"], cell, r["id"]))
            if e and "mean" in e:
                ax.bar(x, e["mean"], yerr=e["std"], capsize=3, color=colors[x % len(colors)])
                ax.text(x, 1, f"n={e['n']}", ha="center", va="bottom", fontsize=7, color="white")
            elif e:
                ax.text(x, 50, e["state"], ha="center", va="center", fontsize=7, rotation=90)
            p = (index.get((col["id"], HEADLINES[cell], r["id"])) or {}).get("paper")
            if p:
                ax.plot([x - 0.4, x + 0.4], [p["value"], p["value"]], color="black", lw=2,
                        label="paper (test-selected)" if x == 0 or not ax.get_legend_handles_labels()[0] else None)
        title = col["label"] if cell in ("acc", "last") else f"{col['label']}\n{CELL_LABELS[cell]}"
        ax.set_title(title, fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=7)
        ax.set_ylim(0, 100)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="lower right")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{table['title']} ({table['scale']}, seeds {', '.join(map(str, table['seeds']))}); "
                 "bars: mean ± std over seeds, last epoch", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_table(table: dict[str, Any], out: Path, machine: str | None = None, figure: bool = True) -> dict[str, Path]:
    """Write ``table.md``, ``table.json``, ``table.csv`` (and ``table.png``) into ``out``."""
    from utils.io import atomic_write

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"md": out / "table.md", "json": out / "table.json", "csv": out / "table.csv"}
    texts = {"md": render_markdown(table, machine), "json": json.dumps(table, indent=1, sort_keys=True) + "\n",
             "csv": render_csv(table)}
    for k, p in files.items():
        atomic_write(p, lambda f, t=texts[k]: f.write(t), binary=False)
    if figure:
        files["png"] = out / "table.png"
        render_figure(table, files["png"])
    return files
