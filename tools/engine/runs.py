"""Run set-up shared by the entry scripts: config, devices, DDP, the checks before the run folder, the run-folder
lock, logging, config changes on resume, and :func:`run_cli` (user errors as one line and exit code 2)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tools.engine.checkpoint import CheckpointError
from tools.engine.trainer import NonFiniteLossError
from utils import dist
from utils.config import load_config, save_config
from utils.errors import ConfigError, DataError
from utils.io import atomic_write, remove_stale_temps
from utils.logging import setup_logging
from utils.misc import git_sha, native_bf16, resolve_device

log = logging.getLogger(__name__)

USER_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLossError, FileNotFoundError)


def run_cli(job, name: str) -> int:
    """Run an entry script's ``job()``: the errors raised on purpose for the user (:data:`USER_ERRORS`)
    become one logged line and exit code 2; anything else is a bug and keeps its traceback."""
    try:
        job()
    except USER_ERRORS as e:
        logging.getLogger(name).error("%s: %s", type(e).__name__, e)
        return 2
    return 0


def prepare_run(config: str, opts: list[str], *, exp_name: str = "default", run_dir: str | None = None,
                resume: bool = False, kind: str = "pretrain", accept_config_change: bool = False,
                task: str | None = None, checks: Callable[[Any], None] | None = None):
    """Load and check the config, initialise devices / DDP / logging, create, lock and record the run folder.

    Everything that can be checked without building the model or reading the data comes first, before
    the run folder is touched (so a typo or a wrong path is reported as such, and leaves no folder): the
    config itself, the device, the entry point (:func:`check_entry_point`, ``task``), the masked-patch
    count of a pre-training model, that each data path the run reads exists (:func:`check_data_paths`),
    that the run folder is not a file, and the caller's own ``checks(cfg)``.

    Rank 0 then takes the run-folder lock (a second run into the folder fails at once), refuses a folder
    that holds a run unless ``resume``, warns when it reuses a folder whose earlier run died before its
    first checkpoint (:func:`holds_run`), and on ``resume`` refuses a config that differs from the saved
    ``config.yaml`` unless ``accept_config_change`` (then the change is appended to ``config-changes.jsonl``).
    A few-shot folder (``kind="fewshot"``) always continues, unless no fold has finished yet: then it is
    reused like a folder that died before its first checkpoint, and its episodes, drawn with the old
    config, are drawn again.
    """
    cfg = load_config(config, opts)
    device = resolve_device(cfg.device)
    out = Path(run_dir) if run_dir else Path("experiments") / Path(config).stem / exp_name
    preflight(cfg, config, kind=kind, task=task, out=out, explicit_dir=run_dir is not None)
    if checks is not None:
        checks(cfg)
    rank, world = dist.init_distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    notes: list[str] = []
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the run folder {out}: {e.strerror}; choose another "
                              f"--run_dir / --exp_name") from None
        lock_run_folder(out)
        held = holds_run(out, kind)
        if held and not resume:
            raise ConfigError(f"{out} already holds a run ({held}); pass --resume to continue it or "
                              f"choose another --exp_name / --run_dir")
        remove_stale_temps(out)
        if kind == "fewshot" and not held:
            resume = False  # nothing finished: start again, with whatever config is given now
            if config_changes(out / "config.yaml", cfg):
                shutil.rmtree(out / "episodes", ignore_errors=True)
        if not resume and kind != "test":  # a --test folder never holds a checkpoint
            left = sorted(p.name for p in out.iterdir() if p.name in ("config.yaml", "metrics.jsonl")
                          or p.suffix == ".log")
            if left:
                notes.append(f"reusing {out}: an earlier run there died before its first checkpoint (found "
                             f"{', '.join(left)}, no {'finished fold' if kind == 'fewshot' else 'ckpt-last.pth'}); "
                             f"starting it again from scratch")
        else:
            change = config_changes(out / "config.yaml", cfg)
            if change and not accept_config_change:
                raise ConfigError(f"--resume with a config that differs from {out / 'config.yaml'}: "
                                  + "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in change.items())
                                  + ". Pass --accept-config-change to continue with the new values, or resume "
                                    "with the old ones")
            if change:
                record_config_change(out, change, opts)
                notes.append("config changed on resume (accepted, recorded in config-changes.jsonl): "
                             + "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in change.items()))
    dist.barrier()
    setup_logging(out / f"{kind}.log", rank)
    for note in notes:
        log.warning("%s", note)
    if rank == 0:
        save_config(cfg, out / "config.yaml")
    log.info("git %s | config %s | run %s | device %s | world %d | threads %d | precision %s",
             git_sha(), config, out, device, world, torch.get_num_threads(), cfg.precision)
    log.info("overrides: %s", " ".join(opts) or "(none)")
    if cfg.precision == "bf16" and not native_bf16(device):
        log.warning("precision bf16 on %s without native bf16 matmuls: autocast emulates them and runs "
                    "several times slower than fp32 here (bench/README.md); consider precision=fp32", device)
    return cfg, device, out


# ------------------------------------------------------------------------------ checks before the folder
TASKS = {"pretrain": "pretrain", "finetune": "classify", "fewshot": "classify", "test": "classify",
         "segment": "segment"}
ENTRY_POINTS = {"pretrain": ("a pre-training", "main_pretrain.py"),
                "classify": ("a classification fine-tuning", "main_finetune.py"),
                "segment": ("a part-segmentation", "segmentation/main.py")}
DATA_PATH_KEYS = ("data_path", "pc_path", "root")  # inputs; *_dir keys (caches) may be created by the run


def preflight(cfg, config: str, *, kind: str = "pretrain", task: str | None = None, out: Path | None = None,
              explicit_dir: bool = True) -> None:
    """The checks :func:`prepare_run` makes before it touches the run folder (each a one-line
    ConfigError / DataError): the folder path is not a file, the config belongs to this entry point, a
    few-shot config comes with ``--fewshot``, a pre-training model masks at least one patch and keeps
    one visible, and every data path the run reads exists."""
    if out is not None and out.exists() and not out.is_dir():
        what = f"--run_dir {out}" if explicit_dir else f"the run folder {out}"
        raise ConfigError(f"{what} is an existing file, not a folder: give a folder path (it is created if "
                          f"missing)" + ("" if explicit_dir else " or another --exp_name"))
    task = task or TASKS.get(kind, "pretrain")
    check_entry_point(cfg, config, task)
    if kind == "finetune" and is_fewshot_config(cfg):
        raise ConfigError(f"{config} is a few-shot config ({is_fewshot_config(cfg)}): add --fewshot to run its "
                          f"way x shot x fold episodes, or fine-tune with a classification config (e.g. "
                          f"cfgs/finetune/quickstart_cls.yaml)")
    if kind == "pretrain":
        check_mask_count(cfg)
        teacher = cfg.get_path("model.gm3d.teacher_ckpt")
        if isinstance(teacher, str) and teacher and not os.path.isfile(teacher):
            src = cfg.source_of("model.gm3d.teacher_ckpt")
            raise CheckpointError(f"model.gm3d.teacher_ckpt = '{teacher}'{f' (set in {src})' if src else ''} does "
                                  f"not exist: run the pre-training that writes it first, or set "
                                  f"model.gm3d.teacher_ckpt=PATH (null: no knowledge teacher)")
    check_data_paths(cfg, run_splits(cfg, kind))


def _model_class(cfg):
    from models.build import MODELS

    name = (cfg.get("model") or {}).get("NAME")
    return name, MODELS.get(name) if isinstance(name, str) else None  # unknown: ConfigError, registered ones


def check_entry_point(cfg, config: str, task: str) -> None:
    """A config whose ``model.NAME`` belongs to another task (a masked autoencoder given to fine-tuning, a
    classifier given to pre-training, ...) is a ConfigError naming the entry point that runs it."""
    from models.base import Classifier, MaskedAutoencoder, SegmentationModel

    name, cls = _model_class(cfg)
    if cls is None:
        return
    bases = {"pretrain": MaskedAutoencoder, "classify": Classifier, "segment": SegmentationModel}
    own = next((t for t, base in bases.items() if isinstance(cls, type) and issubclass(cls, base)), None)
    if own is None or own == task:
        return
    what, script = ENTRY_POINTS[own]
    hint = ""
    if own == "pretrain":
        hint = (f"; to fine-tune its checkpoint, give {ENTRY_POINTS[task][1]} a {ENTRY_POINTS[task][0].split(' ', 1)[1]}"
                f" config and --finetune <run>/ckpt-last.pth")
    raise ConfigError(f"{config} is {what} config (model.NAME: {name}), not {ENTRY_POINTS[task][0]} one: run "
                      f"it with `python {script} --config {config}`{hint}")


def _file_sources(cfg, key: str) -> list[str]:
    from utils.config import COMMAND_LINE, DEFAULTS_PATH

    files = []
    for src in cfg.sources(key):
        if src.startswith(COMMAND_LINE) or Path(src).resolve() == DEFAULTS_PATH.resolve():
            continue
        files.append(src)
    return files


def is_fewshot_config(cfg) -> str:
    """Why ``cfg`` is a few-shot config (a file of it sets ``finetune.fewshot``, or ``dataset.train`` is
    ModelNetFewShot), or ``""``."""
    if str((cfg.get("dataset", {}).get("train") or {}).get("NAME", "")) == "ModelNetFewShot":
        return "dataset.train is ModelNetFewShot"
    files = _file_sources(cfg, "finetune.fewshot")
    return f"{files[0]} sets finetune.fewshot" if files else ""


def _pick_key(cfg, keys: list[str]) -> str | None:
    """Of the dotted ``keys`` present in ``cfg``, the one set on the command line, else the first."""
    from utils.config import COMMAND_LINE

    present = [k for k in keys if cfg.get_path(k) is not None]
    for k in present:
        if (cfg.source_of(k) or "").startswith(COMMAND_LINE):
            return k
    return present[0] if present else None


def check_mask_count(cfg) -> None:
    """A pre-training model masks at least one patch and keeps one visible, with the count rule its
    masker uses (:func:`models.masking.check_masked_count`); the error names the user's own keys."""
    import inspect

    from models.base import MaskedAutoencoder
    from models.gm3d import GM3D
    from models.masking import MASKS, MaskConfig, check_masked_count

    _, cls = _model_class(cfg)
    if not (isinstance(cls, type) and issubclass(cls, MaskedAutoencoder)):
        return
    m2ae = getattr(cls, "ARCH", "") == "point_m2ae"
    official = "model.mask_ratio" if m2ae else "model.transformer_config.mask_ratio"
    ratio_key = _pick_key(cfg, [official, "model.mask.ratio"])
    ratio = cfg.get_path(ratio_key) if ratio_key else (0.8 if m2ae else MaskConfig.ratio)
    if m2ae:
        groups = cfg.get_path("model.num_groups")
        group = groups[-1] if isinstance(groups, list) and groups else None
        group_key = "model.num_groups[-1]"  # the coarsest scale, the one masked
    else:
        group_key = "model.num_group"
        group = cfg.get_path(group_key)
        if group is None:
            group = inspect.signature(cls.__init__).parameters.get("num_group", inspect.Parameter.empty).default
    if not isinstance(group, int) or isinstance(group, bool) or group < 1 or not isinstance(ratio, (int, float)):
        return  # a wrong type or range is reported by the config rules or the model
    strategy = "gm3d" if issubclass(cls, GM3D) else \
        cfg.get_path("model.mask.strategy") or cfg.get_path("model.transformer_config.mask_type") or "rand"
    if strategy not in MASKS:
        return
    count = cfg.get_path("model.mask.count") or MASKS.get(strategy).default_count
    check_masked_count(group, float(ratio), count, ratio_key=ratio_key or f"{official} (default {ratio})",
                       group_key=group_key)


def run_splits(cfg, kind: str) -> list[str]:
    """The ``dataset.*`` sections a run of ``kind`` builds."""
    ds = cfg.get("dataset") or {}
    if kind == "pretrain":
        splits = ["train"]
        if cfg.eval.svm_every > 0:
            splits += ["svm_train", "svm_test"]
        elif (cfg.vis.gc_every > 0 or cfg.vis.probe_every > 0) and ds.get("svm_test"):
            splits.append("svm_test")
        return splits
    if kind == "test":
        return ["test"]
    if kind == "fewshot":
        return ["train", "test"]
    return ["train", "test"] + (["val"] if ds.get("val") else [])


def check_data_paths(cfg, splits: list[str]) -> None:
    """Each path-like input key (``DATA_PATH``, ``PC_PATH``, ``ROOT``) of the named sections exists, else a
    DataError of one line naming the key, the file that set it, and how to point the run elsewhere."""
    from datasets.build import dataset_kwargs

    data_root = cfg.get("data_root")
    for split in splits:
        section = (cfg.get("dataset") or {}).get(split)
        if not section or not isinstance(section, dict):
            continue
        flat = dataset_kwargs(section, data_root)
        for key in DATA_PATH_KEYS:
            value = flat.get(key)
            if not isinstance(value, str) or os.path.exists(value):
                continue
            own = next((k for k in section if isinstance(k, str) and k.lower() == key), None)
            dotted = f"dataset.{split}.{own}" if own else f"dataset.{split}.others.{key}"
            src = cfg.source_of(dotted)
            shown = (section.get(own) if own else (section.get("others") or {}).get(key))
            resolved = f" (with data_root: {value})" if str(shown) != value else ""
            raise DataError(f"{dotted} = '{shown}'{resolved}{f' (set in {src})' if src else ''} does not exist: "
                            f"point the run at your copy with --data PATH, or data_root=DIR for the official "
                            f"layout under DIR (layouts and downloads: docs/DATA.md)")


def holds_run(out: Path, kind: str = "pretrain") -> str | None:
    """What makes ``out`` a run that only ``--resume`` may continue: its ``ckpt-last.pth``, or for a
    few-shot folder a finished fold; None for a folder with neither (a run that died before it)."""
    if kind == "fewshot":
        done = sorted(out.glob("*/fold*/summary.json"))
        return f"finished folds, e.g. {done[0].relative_to(out)}" if done else None
    return "ckpt-last.pth" if (out / "ckpt-last.pth").exists() else None


# ---------------------------------------------------------------------------------------- run folder
LOCK_FILE = ".lock"
_HELD_LOCKS: dict[str, Any] = {}


def lock_run_folder(folder: Path, name: str = LOCK_FILE) -> Any:
    """Hold an exclusive ``fcntl.flock`` on ``folder/name`` (default ``.lock``) until this process exits,
    and return the open lock file (a child process that inherits its descriptor keeps the lock).

    A second process asking for the same folder gets a ConfigError at once, naming the folder and the
    pid recorded by the holder. Taking it again in the process that holds it is a no-op. The job runner
    (tools/launch) holds ``.job.lock`` around the entry point it starts, which takes ``.lock`` itself.
    """
    path = folder / name
    key = str(path.resolve())
    if key in _HELD_LOCKS:
        return _HELD_LOCKS[key]
    fh = open(path, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise ConfigError(f"run folder {folder} is in use by another run (lock {path} held by {holder}); wait "
                          f"for it to finish or choose another --exp_name / --run_dir") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    fh.flush()
    _HELD_LOCKS[key] = fh
    return fh


def release_run_folder(folder: Path, name: str = LOCK_FILE) -> None:
    """Release the lock :func:`lock_run_folder` took (process exit releases it too)."""
    fh = _HELD_LOCKS.pop(str((Path(folder) / name).resolve()), None)
    if fh is not None:
        fh.close()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


_MISSING = "<absent>"


def _show(value: Any) -> str:
    return value if value is _MISSING else json.dumps(value, default=str)


def config_changes(saved: Path, cfg) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` between the run's saved ``config.yaml`` and the new config."""
    if not saved.exists():
        return {}
    old = _flatten(load_config(saved, defaults=None).to_dict())
    new = _flatten(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
    return {k: (old.get(k, _MISSING), new.get(k, _MISSING)) for k in sorted(set(old) | set(new))
            if old.get(k, _MISSING) != new.get(k, _MISSING)}


def record_config_change(out: Path, change: dict[str, tuple[Any, Any]], opts: list[str]) -> None:
    """Append one JSON line describing an accepted change to ``out/config-changes.jsonl``."""
    path = out / "config-changes.jsonl"
    line = json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "overrides": list(opts),
                       "changes": {k: {"old": a, "new": b} for k, (a, b) in change.items()}}, default=str)
    previous = path.read_text() if path.exists() else ""
    atomic_write(path, lambda f: f.write(previous + line + "\n"), binary=False)
