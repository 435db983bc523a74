"""The dependency graph of jobs: order, identities, folders, status, and the run loop.

``Graph(jobs, out)`` checks the jobs (unique names, known dependencies, no cycle), computes each job's
identity in dependency order and merges jobs of equal identity into one (one folder; the names become
aliases: a GM3D row's knowledge teacher and the reference row's pre-training of the same seed are one
run). :meth:`Graph.run` starts every job whose dependencies are done on the executor, as slots free up,
until nothing more can run: a failed job blocks its dependants and nothing else. Everything it knows is
read back from the run folders (:func:`tools.launch.jobs.folder_state`), so :meth:`Graph.status` gives
the same answer from another process, after the launcher has died, or while another launcher runs.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.launch.jobs import Job, folder_state, job_command, job_identity
from utils.errors import ConfigError

__all__ = ["Graph", "JobStatus"]


@dataclass
class JobStatus:
    """What is known of one job: ``state`` is done, running, partial (killed; continues with resume),
    failed, blocked (a dependency failed) or pending; ``result`` is the parsed result file of a done job."""

    name: str
    state: str
    folder: Path | None = None
    identity: str | None = None
    wall_s: float | None = None
    attempts: int = 0
    error: str | None = None
    result: Any = None
    aliases: list[str] = field(default_factory=list)
    deps: list[str] = field(default_factory=list)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_") or "job"


class Graph:
    """Jobs in dependency order, with their identities and folders (see the module docstring).

    Args:
        jobs: the jobs; dependencies are named by ``{run:NAME}`` and ``after``.
        out: the folder under which ``runs/<name>-<identity[:8]>`` folders go.
        python: the interpreter of the entry points.

    Raises:
        ConfigError: a duplicate name, an unknown dependency or a cycle (naming the jobs).
    """

    def __init__(self, jobs: Sequence[Job], out: str | Path, python: str = sys.executable) -> None:
        self.out = Path(out).resolve()
        self.python = python
        self.jobs: dict[str, Job] = {}
        for job in jobs:
            if job.name in self.jobs:
                raise ConfigError(f"two jobs are named {job.name!r}")
            self.jobs[job.name] = job
        for job in jobs:
            for d in job.deps():
                if d not in self.jobs:
                    raise ConfigError(f"job {job.name} depends on {d!r}, which is not a job of this graph")
        self.order = self._topological()
        self._ids: dict[str, str] = {}        # name -> identity
        self._extra: dict[str, list[str]] = {}  # name -> late-bound overrides (Job.prepare)
        self._errors: dict[str, str] = {}     # name -> why it cannot run (a config that does not load)
        self._canon: dict[str, str] = {}      # identity -> first name
        self._resolve({})

    # ------------------------------------------------------------------------------ structure
    def _topological(self) -> list[str]:
        order: list[str] = []
        mark: dict[str, int] = {}

        def visit(name: str, path: list[str]) -> None:
            if mark.get(name) == 2:
                return
            if mark.get(name) == 1:
                cycle = path[path.index(name):] + [name]
                raise ConfigError("jobs depend on each other in a cycle: " + " -> ".join(cycle))
            mark[name] = 1
            for d in self.jobs[name].deps():
                visit(d, [*path, name])
            mark[name] = 2
            order.append(name)

        for name in self.jobs:
            visit(name, [])
        return order

    def _resolve(self, statuses: Mapping[str, JobStatus]) -> None:
        """Compute every identity that can be computed now."""
        for name in self.order:
            self._resolve_one(name, statuses)

    def _resolve_one(self, name: str, statuses: Mapping[str, JobStatus]) -> None:
        """``name``'s identity once its dependencies' are known (and, for a ``prepare`` job, once they are done)."""
        if name in self._ids or name in self._errors:
            return
        job = self.jobs[name]
        deps = job.deps()
        if any(d in self._errors for d in deps) or not all(d in self._ids for d in deps):
            return
        extra: list[str] = []
        if job.prepare is not None:
            dep_status = {d: statuses.get(d) for d in deps}
            if not all(s is not None and s.state == "done" for s in dep_status.values()):
                return
            extra = list(job.prepare(dep_status))
        try:
            ident = job_identity(job, {d: self._ids[d] for d in deps}, extra)
        except ConfigError as e:
            self._errors[name] = str(e)
            return
        self._ids[name], self._extra[name] = ident, extra
        self._canon.setdefault(ident, name)

    def canonical(self, name: str) -> str:
        """The name whose folder ``name`` shares (itself unless an earlier job has the same identity)."""
        ident = self._ids.get(name)
        return self._canon.get(ident, name) if ident else name

    def folder(self, name: str) -> Path | None:
        """The run folder of ``name`` (None while its identity is not known)."""
        job = self.jobs[self.canonical(name)]
        if job.run_dir is not None:
            return Path(job.run_dir).resolve()
        ident = self._ids.get(name)
        return None if ident is None else self.out / "runs" / f"{_slug(job.name)}-{ident[:8]}"

    def identity(self, name: str) -> str | None:
        return self._ids.get(name)

    def command(self, name: str) -> tuple[list[str], int] | None:
        """The command line of ``name`` and the index of its resume arguments (None while unknown)."""
        folder = self.folder(name)
        job = self.jobs[name]
        folders = {d: self.folder(d) for d in job.deps()}
        if folder is None or name not in self._ids or any(f is None for f in folders.values()):
            return None
        return job_command(job, folders, folder, self._extra.get(name, []), self.python)

    def plan(self) -> list[dict[str, Any]]:
        """Every distinct job in dependency order: name, aliases, dependencies, identity, folder, command,
        ``est_s``, error (a config that does not load)."""
        rows = []
        for name in self.order:
            if self.canonical(name) != name:
                continue
            cmd = self.command(name)
            rows.append({"name": name, "aliases": self.aliases(name), "job": self.jobs[name],
                         "deps": [self.canonical(d) for d in self.jobs[name].deps()],
                         "identity": self._ids.get(name), "folder": self.folder(name),
                         "cmd": cmd[0] if cmd else None, "est_s": self.jobs[name].est_s,
                         "error": self._errors.get(name)})
        return rows

    def aliases(self, name: str) -> list[str]:
        ident = self._ids.get(name)
        return [n for n in self.order if n != name and ident is not None and self._ids.get(n) == ident]

    # ------------------------------------------------------------------------------ status
    def status(self) -> dict[str, JobStatus]:
        """Every job's status, read from the folders (every alias gets its canonical job's status)."""
        out: dict[str, JobStatus] = {}
        for name in self.order:  # dependencies first: a prepare job's identity follows their statuses
            self._resolve_one(name, out)
            job = self.jobs[name]
            deps = [self.canonical(d) for d in job.deps()]
            if name in self._errors:
                out[name] = JobStatus(name, "failed", error=self._errors[name], deps=deps)
                continue
            canon = self.canonical(name)
            if canon != name and canon in out:
                out[name] = JobStatus(**{**out[canon].__dict__, "name": name})
                continue
            bad = [d for d in deps if d in out and out[d].state in ("failed", "blocked")]
            folder = self.folder(name)
            if folder is None or name not in self._ids:  # its identity waits on its dependencies
                state = "blocked" if bad else "pending"
                out[name] = JobStatus(name, state, deps=deps,
                                      error=f"dependency {bad[0]} {out[bad[0]].state}" if bad else None)
                continue
            st = folder_state(folder, self._ids[name], job.result)
            state = st["state"]
            if state == "pending" and bad:
                state = "blocked"
            js = JobStatus(name, state, folder, self._ids[name], st.get("wall_s"), int(st.get("attempts", 0)),
                           st.get("error"), aliases=self.aliases(name), deps=deps)
            if state == "blocked":
                js.error = f"dependency {bad[0]} {out[bad[0]].state}"
            if state == "done":
                js.result = _read_result(folder / job.result)
            out[name] = js
        return out

    # ------------------------------------------------------------------------------ running
    def payload(self, name: str, env: Mapping[str, str] | None = None,
                launcher: Sequence[str] | None = None) -> dict[str, Any]:
        """The plain-data description of ``name`` that :func:`tools.launch.jobs.run_job` runs; ``launcher``
        replaces the interpreter (e.g. ``python -m torch.distributed.run --nproc_per_node 2``)."""
        cmd, at = self.command(name)
        if launcher:
            cmd = [*launcher, *cmd[1:]]
            at += len(launcher) - 1
        job = self.jobs[name]
        return {"name": name, "identity": self._ids[name], "folder": str(self.folder(name)), "cmd": cmd,
                "resume_index": at, "resume": list(job.resume), "resume_from": job.resume_from,
                "result": job.result, "env": dict(env or {}), "meta": dict(job.meta)}

    def run(self, executor: Any, poll_s: float = 0.5, on_event: Callable[[str, JobStatus], None] | None = None,
            on_tick: Callable[[dict[str, JobStatus]], None] | None = None,
            only: Callable[[str], bool] | None = None) -> dict[str, JobStatus]:
        """Run what is not done, in dependency order, until nothing more can run; returns :meth:`status`.

        A pending or killed (``partial``) job starts when its dependencies are done and the executor has
        room; a job that failed before this call is tried once more (a lost node, a fixed data path), one
        that fails now is not. A job another launcher is running is waited for, never started twice.
        ``executor`` offers ``capacity(job) -> bool``, ``reserve(job)`` and ``submit(graph, [names]) ->
        {name: handle}`` (a handle has ``done()`` and ``result()``). ``on_event(what, status)`` hears every
        start (``"start"``), success (``"done"``) and failure (``"failed"``); ``on_tick(statuses)`` follows
        every finished job (the CLI rewrites its table there). ``only(name)``: start only the jobs it
        accepts (the others are used when done, waited for when running elsewhere, and never started).
        """
        active: dict[str, Any] = {}
        tried: set[str] = set()

        def eligible(name: str, st: JobStatus) -> bool:
            if self.canonical(name) != name or name in active or name in self._errors:
                return False
            if only is not None and not only(name):
                return False
            return st.state in ("pending", "partial") or (st.state == "failed" and name not in tried)

        while True:
            statuses = self.status()
            ready = []
            for name in self.order:
                st = statuses[name]
                if eligible(name, st) and all(statuses[d].state == "done" for d in st.deps) \
                        and executor.capacity(self.jobs[name]):
                    executor.reserve(self.jobs[name])
                    ready.append(name)
            if ready:
                tried |= set(ready)
                for name, handle in executor.submit(self, ready).items():
                    active[name] = handle
                    if on_event:
                        on_event("start", statuses[name])
            finished = []
            for name in list(active):
                handle = active[name]
                if not handle.done():
                    continue
                del active[name]
                try:
                    outcome = handle.result()
                except Exception as e:  # the executor itself failed (submitit, a lost node): record it
                    outcome = {"state": "failed"}
                    _record_failure(self.folder(name), self._ids[name], name, f"{type(e).__name__}: {e}")
                if outcome.get("state") != "busy":  # busy: another launcher took it first; wait for that one
                    finished.append(name)
            if finished and (on_event or on_tick):
                statuses = self.status()  # read once for every job that finished in this round
                for name in finished:
                    if on_event:
                        on_event("done" if statuses[name].state == "done" else "failed", statuses[name])
                if on_tick:
                    on_tick(statuses)
            if not active:
                statuses = self.status()
                canon = [n for n in self.order if self.canonical(n) == n]
                elsewhere = any(statuses[n].state == "running" for n in canon)
                startable = any(eligible(n, statuses[n]) and all(statuses[d].state == "done" for d in statuses[n].deps)
                                for n in canon)
                if not elsewhere and not startable:
                    return statuses
            time.sleep(poll_s)


def _read_result(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _record_failure(folder: Path | None, identity: str | None, name: str, text: str) -> None:
    """Write a failed ``job.json`` for a job whose executor failed before the job could record anything."""
    if folder is None:
        return
    from tools.launch.jobs import read_state, write_state

    folder.mkdir(parents=True, exist_ok=True)
    old = read_state(folder) or {}
    if old.get("state") in ("done", "failed") and old.get("identity") == identity:
        return
    write_state(folder, {**old, "name": name, "identity": identity, "state": "failed",
                          "attempts": int(old.get("attempts", 0)) + 1,
                          "error": text.strip().splitlines()[-1] if text.strip() else "executor failed"})
