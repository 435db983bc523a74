"""Few-shot classification (docs/METHOD.md, section 6.4): way/shot settings x folds, mean ± std.

Per fold the classifier is fine-tuned from the same initialisation (the pre-trained encoder, or the
seeded random init with ``--scratch``) on the fold's ``way x shot`` support shapes and tested on its
``way x query`` query shapes every ``finetune.eval_every`` epochs; the last-epoch and the best-epoch
(test-selected, the official protocol) accuracies are kept. A setting reports mean ± std (sample std,
ddof=1, ``tools/tasks/stats.py``) and a 95 % t-interval over its folds, and the query count per fold; the table
goes to ``<run>/fewshot.md`` and ``<run>/fewshot.json``.

Episodes:

* ``dataset.train`` of ``NAME: ModelNetFewShot`` (the official ``ModelNetFewshot/{way}way_{shot}shot/
  {fold}.pkl`` folds, Point-BERT's download or ``tools/prepare_data.py fewshot``): each fold is read
  with ``way``, ``shot``, ``fold`` set; ``dataset.test`` must be ModelNetFewShot too (subset test).
* any other classification data set (the default ``SyntheticShapes``): its train and test splits are
  written as ModelNet-style ``.dat`` caches in ``<run>/episodes/source`` and the folds are drawn by the
  very sampler of ``tools/prepare_data.py fewshot`` (:func:`datasets.modelnet_fewshot.generate_fewshot`,
  seeded by ``(seed, way, shot, fold)``: ``way`` classes, ``shot`` support shapes per class from the
  train split, ``finetune.fewshot.query`` query shapes per class from the test split), then read back
  with the same ``ModelNetFewShot`` loader. Support and query never share a shape.

A fold that already has ``summary.json`` in its folder is not run again, so an interrupted few-shot
run continues where it stopped when started again with the same ``--run_dir`` / ``--exp_name``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from utils.errors import ConfigError
from utils.io import atomic_write

log = logging.getLogger(__name__)

__all__ = ["episode_source", "write_episodes", "fold_datasets", "run_fewshot", "fewshot_table"]


def _section_name(cfg: Mapping[str, Any], split: str) -> str:
    from tools.engine.builders import section
    from datasets.build import dataset_kwargs

    return dataset_kwargs(section(cfg, f"dataset.{split}"))["NAME"]


def _source_arrays(dataset) -> tuple[list[np.ndarray], np.ndarray]:
    """All clouds and labels of a classification data set, as stored (``points`` / ``labels``
    attributes, e.g. SyntheticShapes) or item by item."""
    if hasattr(dataset, "points") and hasattr(dataset, "labels"):
        pts, labels = dataset.points, np.asarray(dataset.labels, dtype=np.int64)
        return [np.asarray(p, dtype=np.float32) for p in pts], labels
    clouds, labels = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        clouds.append(item["points"].numpy().astype(np.float32))
        labels.append(int(item["label"]))
    return clouds, np.asarray(labels, dtype=np.int64)


def episode_source(cfg: Mapping[str, Any]) -> str:
    """``official`` when dataset.train is ModelNetFewShot, else ``generated``."""
    return "official" if _section_name(cfg, "train") == "ModelNetFewShot" else "generated"


def write_episodes(cfg: Mapping[str, Any], out: Path, way: int, shot: int, folds: int) -> tuple[str, int, int]:
    """Draw ``folds`` episodes of a setting from dataset.train / dataset.test with the sampler of
    ``tools/prepare_data.py fewshot``. Returns ``(episodes folder, num_category, n_points)``."""
    from datasets.io import write_cloud_cache
    from datasets.modelnet40 import modelnet_cache_path
    from datasets.modelnet_fewshot import fewshot_path, generate_fewshot
    from tools.engine.builders import build_split

    fs = cfg["finetune"]["fewshot"]
    src = out / "episodes" / "source"
    meta_file = src / "source.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
    else:
        meta = {}
        for split in ("train", "test"):
            ds = build_split(cfg, split)
            clouds, labels = _source_arrays(ds)
            n_points = min(len(c) for c in clouds)
            clouds = [c[:n_points] for c in clouds]
            num_category = int(getattr(ds, "num_classes", int(labels.max()) + 1))
            meta[split] = {"num_category": num_category, "n_points": n_points, "shapes": len(clouds)}
            write_cloud_cache(modelnet_cache_path(str(src), num_category, split, n_points), clouds, labels)
        if meta["train"]["num_category"] != meta["test"]["num_category"]:
            raise ConfigError(f"few-shot source: dataset.train has {meta['train']['num_category']} classes, "
                              f"dataset.test {meta['test']['num_category']}")
        if meta["train"]["n_points"] != meta["test"]["n_points"]:
            raise ConfigError("few-shot source: dataset.train and dataset.test give clouds of different sizes "
                              f"({meta['train']['n_points']} vs {meta['test']['n_points']}); set npoints in both")
        meta_file.write_text(json.dumps(meta, indent=2))
    num_category, n_points = meta["train"]["num_category"], meta["train"]["n_points"]
    if way > num_category:
        raise ConfigError(f"{way}-way few-shot needs {way} classes; the source data set has {num_category}")
    episodes = out / "episodes"
    if not all(Path(fewshot_path(str(episodes), way, shot, f)).exists() for f in range(folds)):
        generate_fewshot(str(src), str(episodes), way, shot, folds=folds, query=int(fs["query"]),
                         seed=int(cfg["seed"]), num_category=num_category, n_points=n_points)
    return str(episodes), num_category, n_points


def fold_datasets(cfg: Mapping[str, Any], out: Path, way: int, shot: int, fold: int, folds: int):
    """(support set, query set) of one fold, both ``ModelNetFewShot``."""
    from datasets.modelnet_fewshot import ModelNetFewShot
    from tools.engine.builders import build_split

    if episode_source(cfg) == "official":
        if _section_name(cfg, "test") != "ModelNetFewShot":
            raise ConfigError("few-shot with ModelNetFewShot folds needs dataset.test to be ModelNetFewShot "
                              "(others: {subset: test}), the fold's query shapes")
        kw = {"way": way, "shot": shot, "fold": fold}
        return build_split(cfg, "train", **kw), build_split(cfg, "test", **kw)
    path, num_category, n_points = write_episodes(cfg, out, way, shot, folds)
    common = {"data_path": path, "n_points": n_points, "num_category": num_category, "way": way, "shot": shot,
              "fold": fold, "seed": int(cfg["seed"])}
    return ModelNetFewShot(subset="train", **common), ModelNetFewShot(subset="test", **common)


def _settings(cfg: Mapping[str, Any], way: int | None, shot: int | None) -> list[tuple[int, int]]:
    fs = cfg["finetune"]["fewshot"]
    ways = [way] if way is not None else list(fs["ways"])
    shots = [shot] if shot is not None else list(fs["shots"])
    return [(int(w), int(s)) for w in ways for s in shots]


def _run_fold(cfg, ckpt, scratch, support, query, fold_dir: Path, device) -> dict[str, Any]:
    from tools.engine.builders import build_transform
    from tools.engine.trainer import Trainer
    from tools.tasks.finetune import AccuracyEvaluator, TrainSampling, build_finetune_model

    fc = cfg["finetune"]
    model, info = build_finetune_model(cfg, ckpt=ckpt, scratch=scratch)
    npoints = int(cfg["npoints"])
    ev = AccuracyEvaluator(query, npoints, name="test", every=int(fc["eval_every"]), batch_size=int(fc["eval_bs"]),
                           device=device)
    trainer = Trainer(cfg, model, support, fold_dir, evaluators=[ev],
                      transform=TrainSampling(npoints, fc["point_all"], build_transform(cfg)), device=device,
                      write_summary=False)  # the fold's summary.json marks a finished fold
    summary = trainer.fit()
    result = {"last_epoch": summary["last_epoch"], "last_acc": (summary.get("last") or {}).get("test_acc"),
              "best_epoch": summary.get("best_epoch"), "best_acc": summary.get("best_value"),
              "support": len(support), "query": len(query), "init": info["init"]}
    if not fc["fewshot"]["keep_ckpt"]:
        for f in fold_dir.glob("ckpt-*.pth"):
            f.unlink()
    text = json.dumps(result, indent=2)
    atomic_write(fold_dir / "summary.json", lambda f: f.write(text), binary=False)
    return result


def fewshot_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table: one row per setting, last-epoch and best-epoch mean ± std over folds."""
    from tools.tasks.stats import mean_std

    from tools.tasks.stats import t_interval

    lines = ["| setting | folds | last epoch: mean ± std (%) | best epoch, test-selected: mean ± std (%) "
             "| last epoch: 95 % t-interval (%) |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        lm, ls = mean_std(r["last"])
        bm, bs = mean_std(r["best"])
        lo, hi = t_interval(r["last"])
        lines.append(f"| {name} | {len(r['last'])} | {lm:.2f} ± {ls:.2f} | {bm:.2f} ± {bs:.2f} | {lo:.1f}-{hi:.1f} |")
    return "\n".join(lines)


def run_fewshot(config: str, opts: list[str], *, exp_name: str = "default", run_dir: str | None = None,
                ckpt: str | None = None, scratch: bool = False, way: int | None = None, shot: int | None = None,
                fold: int | None = None, accept_config_change: bool = False) -> dict[str, Any]:
    """Run the few-shot settings of a config (or the one given) over their folds; print mean ± std."""
    from tools.tasks.finetune import check_best_metric
    from tools.tasks.stats import format_mean, mean_std
    from tools.engine.runs import prepare_run
    from utils import dist

    # resume=True: a few-shot run folder continues fold by fold (finished folds are skipped)
    cfg, device, out = prepare_run(config, opts, exp_name=exp_name, run_dir=run_dir, resume=True, kind="fewshot",
                                   accept_config_change=accept_config_change,
                                   checks=lambda c: check_best_metric(c, ("test_acc",)))
    fs = cfg.finetune.fewshot
    folds = int(fs.folds)
    fold_ids = [fold] if fold is not None else list(range(folds))
    if fold is not None and not 0 <= fold < folds:
        raise ConfigError(f"--fold {fold} is outside 0..{folds - 1} (finetune.fewshot.folds={folds})")
    if dist.get_world_size() > 1:
        raise ConfigError("few-shot runs are single-process (each fold is a small fine-tuning); launch with python")
    results: dict[str, dict[str, Any]] = {}
    for w, s in _settings(cfg, way, shot):
        name = f"{w}-way {s}-shot"
        rows = []
        for f in fold_ids:
            fold_dir = out / f"{w}way_{s}shot" / f"fold{f}"
            done = fold_dir / "summary.json"
            if done.exists():
                r = json.loads(done.read_text())
                log.info("%s fold %d: already done (%s), reusing", name, f, done)
            else:
                support, query = fold_datasets(cfg, out, w, s, f, folds)
                log.info("%s fold %d: %d support / %d query shapes", name, f, len(support), len(query))
                fold_dir.mkdir(parents=True, exist_ok=True)
                r = _run_fold(cfg, ckpt, scratch, support, query, fold_dir, device)
            log.info("%s fold %d: last epoch (%s) %.2f %%, best epoch (%s, test-selected) %.2f %%", name, f,
                     r["last_epoch"], r["last_acc"], r["best_epoch"], r["best_acc"])
            rows.append(r)
        results[name] = {"folds": fold_ids, "last": [r["last_acc"] for r in rows],
                         "best": [r["best_acc"] for r in rows], "last_epoch": rows[0]["last_epoch"],
                         "best_epochs": [r["best_epoch"] for r in rows], "query": rows[0].get("query")}
    table = fewshot_table(results)
    init = ckpt or "scratch (random init)"
    header = (f"# Few-shot classification\n\nconfig `{config}`, init `{init}`, {int(cfg.max_epoch)} epochs per fold, "
              f"source: {episode_source(cfg)} episodes. Std: sample std (ddof=1) over folds. The best epoch is "
              f"selected on the fold's query (test) shapes, as in the official protocol; the last epoch is "
              f"not selected.\n\n")
    (out / "fewshot.md").write_text(header + table + "\n")
    (out / "fewshot.json").write_text(json.dumps(results, indent=2))
    print(f"run folder: {out}")
    for name, r in results.items():
        lm, ls = mean_std(r["last"])
        bm, bs = mean_std(r["best"])
        print(f"{name} over {len(r['last'])} folds: last epoch ({r['last_epoch']}) {lm:.2f} ± {ls:.2f} %, "
              f"best epoch (test-selected) {bm:.2f} ± {bs:.2f} %")
        print(f"  last epoch: {format_mean(r['last'], 'folds')}; {r['query']} query shapes per fold")
    print(f"table: {out / 'fewshot.md'}", flush=True)
    return results
