"""One job of the runner: a run of an entry point with a config, overrides and a run folder.

A :class:`Job` is data. ``{run:NAME}`` in its config, arguments or overrides stands for job NAME's run
folder and makes NAME a dependency (a fine-tuning names its pre-training's ``{run:...}/ckpt-last.pth``, a
GM3D pre-training its knowledge teacher's); ``{self}`` is the job's own folder.

Identity (:func:`job_identity`): a SHA-256 over the entry point, its arguments, the resolved config
(``load_config(config, overrides)``, so two spellings of the same config are one job) and the identities
of the jobs it depends on, with ``{run:X}`` replaced by X's identity, not by a path. The code version is not
part of it: a finished job stays finished across commits.

State lives in the run folder, so it survives the launcher: ``job.json`` (identity, name, command, state,
attempts, summed wall-clock, exit code, error) and ``job.log`` (the entry point's output, every attempt).
:func:`run_job` runs one job wherever it is sent (a thread of the local executor, a SLURM job through
submitit). It holds ``.job.lock`` in the folder (``tools.engine.runs.lock_run_folder``; the entry point inherits
the descriptor, so the lock lasts as long as the run even if the launcher dies), so a second launcher
never runs the job twice; it reuses a finished job, continues a killed one with the job's ``resume``
arguments when the folder holds ``resume_from``, and records a failure with the tail of the log.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.engine.runs import lock_run_folder, release_run_folder
from utils.config import load_config
from utils.errors import ConfigError
from utils.io import atomic_write

REPO = Path(__file__).resolve().parents[2]
RUN_REF = re.compile(r"\{run:([^{}]+)\}")
SELF = "{self}"
STATE_FILE = "job.json"
LOG_FILE = "job.log"
JOB_LOCK = ".job.lock"

__all__ = ["Job", "job_identity", "job_command", "run_job", "folder_state", "read_state", "write_state", "log_tail", "REPO"]


@dataclass
class Job:
    """One run of an entry point (see the module docstring).

    Args:
        name: unique, readable (``point_mae_gm3d/s0/pretrain``).
        entry: the script, relative to the repository (``main_pretrain.py``, ``main_finetune.py``,
            ``segmentation/main.py``, ``tools/eval_svm.py``, ``tools/gc_probe.py``).
        config: the YAML given as ``--config`` (relative to the repository, or ``{run:X}/config.yaml``);
            None for an entry point without one.
        args: arguments before the overrides (``["--fewshot"]``, ``["--finetune", "{run:X}/ckpt-last.pth"]``).
        opts: ``key=value`` overrides.
        folder_args: how the entry point is told its folder (``["--json", "{self}/svm.json"]`` for the SVM).
        result: the file in the folder that a successful run leaves (its numbers); the job is done when the
            entry point exits 0 and this file exists.
        resume_from / resume: when the folder holds ``resume_from``, ``resume`` is added to the command
            (``--resume`` after a kill); None for entry points that continue by themselves (few-shot) or
            are cheap to run again (SVM).
        after: dependencies that no ``{run:...}`` names.
        gpus: GPUs of one run (more than one: ``torchrun`` on the local executor, a multi-GPU allocation on
            SLURM); ignored on a machine without GPUs. cpus: CPU cores of one run.
        est_s: an estimate of its device time, for ``--dry-run`` (None: unknown).
        meta: free-form (row, column, seed, scale of a study), kept in ``job.json``.
        run_dir: an explicit run folder (default ``<out>/runs/<name>-<identity[:8]>``).
        prepare: late-bound overrides, computed from the dependencies' statuses when they are done
            (``tools/compare_masking.py`` sizes its equal-time arm from two wall-clocks); part of the identity.
    """

    name: str
    entry: str
    config: str | None = None
    args: list[str] = field(default_factory=list)
    opts: list[str] = field(default_factory=list)
    folder_args: list[str] = field(default_factory=lambda: ["--run_dir", SELF])
    result: str = "summary.json"
    resume_from: str | None = "ckpt-last.pth"
    resume: list[str] = field(default_factory=lambda: ["--resume"])
    after: list[str] = field(default_factory=list)
    gpus: int = 1
    cpus: int = 1
    est_s: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    run_dir: str | None = None
    prepare: Callable[[Mapping[str, Any]], list[str]] | None = None

    def deps(self) -> list[str]:
        """The names of the jobs this one needs, in order of first mention."""
        names: list[str] = []
        for text in (self.config or "", *self.args, *self.opts, *self.folder_args):
            names += RUN_REF.findall(text)
        return list(dict.fromkeys([*names, *self.after]))


def repo_path(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO / p


def job_identity(job: Job, dep_ids: Mapping[str, str], extra_opts: Sequence[str] = ()) -> str:
    """The job's identity (hex SHA-256); ``dep_ids`` maps each dependency's name to its identity.

    Raises:
        ConfigError: the config does not load (named with the job), or the entry point does not exist.
    """
    if not repo_path(job.entry).is_file():
        raise ConfigError(f"job {job.name}: entry point {job.entry} does not exist")

    def sub(text: str) -> str:
        return RUN_REF.sub(lambda m: f"<job {dep_ids[m.group(1)]}>", text)

    opts = [sub(o) for o in (*job.opts, *extra_opts)]
    config: Any = None
    if job.config is not None and RUN_REF.search(job.config):
        config = {"file": sub(job.config), "overrides": opts}  # the dependency's identity fixes that file
    elif job.config is not None:
        try:
            config = load_config(repo_path(job.config), opts).to_dict()
        except ConfigError as e:
            raise ConfigError(f"job {job.name}: {e}") from None
    payload = {"entry": job.entry, "args": [sub(a) for a in job.args], "config": config,
               "overrides": opts if job.config is None else None, "result": job.result,
               "deps": sorted(dep_ids[d] for d in job.deps())}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def job_command(job: Job, folders: Mapping[str, Path], folder: Path, extra_opts: Sequence[str] = (),
                python: str = sys.executable) -> tuple[list[str], int]:
    """The command line of ``job`` run in ``folder`` (``folders``: its dependencies' folders), and the
    index at which resume arguments go (before the folder arguments and the overrides)."""
    def sub(text: str) -> str:
        return RUN_REF.sub(lambda m: str(folders[m.group(1)]), text).replace(SELF, str(folder))

    cmd = [python, str(repo_path(job.entry))]
    if job.config is not None:
        cmd += ["--config", sub(job.config)]
    cmd += [sub(a) for a in job.args]
    at = len(cmd)
    cmd += [sub(a) for a in job.folder_args] + [sub(o) for o in (*job.opts, *extra_opts)]
    return cmd, at


# ------------------------------------------------------------------------------------------ state
def read_state(folder: Path) -> dict[str, Any] | None:
    """The folder's ``job.json``, or None (no job ran there, or the file is unreadable)."""
    try:
        return json.loads((Path(folder) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_state(folder: Path, state: Mapping[str, Any]) -> None:
    text = json.dumps(state, indent=1, default=str) + "\n"
    atomic_write(Path(folder) / STATE_FILE, lambda f: f.write(text), binary=False)


def is_locked(folder: Path) -> bool:
    """Whether a run holds the folder's job lock now (this process's own lock counts as held)."""
    path = Path(folder) / JOB_LOCK
    if not path.exists():
        return False
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return False


def log_tail(folder: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of the folder's ``job.log`` (its latest attempt)."""
    try:
        text = (Path(folder) / LOG_FILE).read_text(errors="replace")
    except OSError:
        return ""
    text = text.rsplit("\n==== attempt ", 1)[-1]
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _error_line(folder: Path, rc: int, result: str) -> str:
    tail = log_tail(folder, 60).splitlines()
    flagged = [x for x in tail if "ERROR" in x or "Error" in x or "error:" in x]
    what = (flagged or [x for x in tail if x.strip()] or ["(no output)"])[-1].strip()
    if rc == 0:
        return f"exit 0 but no {result} written; last line: {what}"
    return f"exit {rc}: {what}"


def folder_state(folder: Path, identity: str | None, result: str) -> dict[str, Any]:
    """What the folder says about the job of ``identity``, without running anything: a dict with
    ``state`` (done, running, partial: killed, continues with resume; failed; pending: never started),
    and the ``job.json`` fields."""
    folder = Path(folder)
    state = read_state(folder)
    if state is None:
        return {"state": "running" if is_locked(folder) else "pending"}
    if identity is not None and state.get("identity") != identity:
        return {"state": "failed", "error": f"{folder} holds another job ({state.get('name')}, identity "
                                            f"{str(state.get('identity'))[:12]}); remove it or choose another --out"}
    if is_locked(folder):
        return {**state, "state": "running"}
    if state.get("state") == "done" and (folder / result).exists():
        return state
    if state.get("state") == "failed":
        return state
    return {**state, "state": "partial"}


# --------------------------------------------------------------------------------------- running
def run_job(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Run one job described by ``payload`` (plain data: it travels to a SLURM node): keys ``name``,
    ``identity``, ``folder``, ``cmd``, ``resume_index``, ``resume``, ``resume_from``, ``result``, ``env``
    (added to the environment), ``meta``. Returns the final state (the ``job.json`` contents) or
    ``{"state": "busy"}`` when another process holds the folder's job lock."""
    folder = Path(payload["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    try:
        lock = lock_run_folder(folder, JOB_LOCK)
    except ConfigError:
        return {"state": "busy", "folder": str(folder)}
    try:
        old = read_state(folder) or {}
        if old.get("identity") not in (None, payload["identity"]):
            return folder_state(folder, payload["identity"], payload["result"])
        if old.get("state") == "done" and (folder / payload["result"]).exists():
            return {**old, "reused": True}
        cmd = list(payload["cmd"])
        resumed = bool(payload.get("resume_from")) and (folder / payload["resume_from"]).exists()
        if resumed:
            at = int(payload["resume_index"])
            cmd[at:at] = list(payload["resume"])
        base = {"name": payload["name"], "identity": payload["identity"], "meta": payload.get("meta", {}),
                "cmd": cmd, "result": payload["result"], "attempts": int(old.get("attempts", 0)) + 1,
                "resumed": resumed, "host": socket.gethostname(), "env": dict(payload.get("env") or {})}
        spent = float(old.get("wall_s") or 0.0)
        write_state(folder, {**base, "state": "running", "pid": os.getpid(), "wall_s": spent,
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        env = {**os.environ, **(payload.get("env") or {})}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
        t0 = time.time()
        with open(folder / LOG_FILE, "ab") as log:
            log.write(f"\n==== attempt {base['attempts']} {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{shlex.join(cmd)}\n".encode())
            log.flush()
            rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, pass_fds=(lock.fileno(),)).returncode
        wall = time.time() - t0
        ok = rc == 0 and (folder / payload["result"]).exists()
        final = {**base, "state": "done" if ok else "failed", "rc": rc, "wall_s": spent + wall,
                 "last_wall_s": wall, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "error": None if ok else _error_line(folder, rc, payload["result"])}
        write_state(folder, final)
        return final
    finally:
        release_run_folder(folder, JOB_LOCK)
