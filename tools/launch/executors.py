"""Where jobs run: :class:`LocalExecutor` (slots on this machine, one GPU per job when there are GPUs,
``torchrun`` for a job that asks for several) and :class:`SlurmExecutor` (SLURM through submitit).

Both run :func:`tools.launch.jobs.run_job`, so a job does the same things wherever it runs: it takes its
folder's job lock, reuses a finished run, continues a killed one with ``--resume`` and records its state
in the folder. The graph (:meth:`tools.launch.graph.Graph.run`) keeps the dependency order; the executors
only start what it hands them.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tools.launch.jobs import Job, run_job
from utils.errors import ConfigError

__all__ = ["LocalExecutor", "SlurmExecutor", "visible_gpus"]


def visible_gpus() -> list[str]:
    """The GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else what torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no usable CUDA runtime: a CPU machine
        return []


class LocalExecutor:
    """Jobs on this machine, ``slots`` at a time.

    With GPUs (``gpus``, default :func:`visible_gpus`), each job gets ``job.gpus`` of them through
    ``CUDA_VISIBLE_DEVICES`` and the slots default to the number of GPUs; a job asking for more than one
    runs under ``torchrun --standalone --nproc_per_node N`` (DDP, which the pre-training entry point
    supports). Without GPUs, ``slots`` jobs share the CPU; give each ``threads=`` in its overrides.
    """

    def __init__(self, slots: int | None = None, gpus: Sequence[str] | None = None) -> None:
        self.gpus = list(visible_gpus() if gpus is None else gpus)
        self.slots = int(slots) if slots else max(1, len(self.gpus))
        if self.slots < 1:
            raise ConfigError(f"--slots must be >= 1, got {slots}")
        self._free = list(self.gpus)
        self._used = 0
        self._reserved: list[int] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="job")

    def _want(self, job: Job) -> int:
        return min(max(1, int(job.gpus)), len(self.gpus)) if self.gpus else 0

    def capacity(self, job: Job) -> bool:
        with self._lock:
            pending = len(self._reserved)
            gpus_left = len(self._free) - sum(self._reserved)
            return self._used + pending < self.slots and gpus_left >= self._want(job)

    def reserve(self, job: Job) -> None:
        with self._lock:
            self._reserved.append(self._want(job))

    def describe(self, job: Job) -> str:
        n = self._want(job)
        where = f"{n} GPU{'s' if n != 1 else ''}" if n else "CPU"
        return f"local, {where}{', torchrun' if n > 1 else ''}"

    def submit(self, graph: Any, names: Sequence[str]) -> dict[str, Future]:
        handles = {}
        for name in names:
            job = graph.jobs[name]
            with self._lock:
                n = self._reserved.pop(0) if self._reserved else self._want(job)
                gpus, self._free = self._free[:n], self._free[n:]
                self._used += 1
            env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if self.gpus else {}
            launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
                        if n > 1 else None)
            payload = graph.payload(name, env=env, launcher=launcher)
            handles[name] = self._pool.submit(self._run, payload, gpus)
        return handles

    def _run(self, payload: Mapping[str, Any], gpus: list[str]) -> dict[str, Any]:
        try:
            return run_job(payload)
        finally:
            with self._lock:
                self._free.extend(gpus)
                self._used -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


class _SubmititCall:
    """The callable submitit runs on the node: :func:`run_job`. It is checkpointable: on pre-emption or
    time-out submitit requeues it, and the next attempt continues the run from its ``ckpt-last.pth``."""

    def __call__(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        return run_job(payload)

    def checkpoint(self, payload: Mapping[str, Any]) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, payload)


class SlurmExecutor:
    """Jobs on a SLURM cluster through submitit (``cluster="slurm"``), or on this machine through
    submitit's local executor (``cluster="local"``: the same submit / poll / collect path, for tests and
    for trying a study without a cluster).

    Args:
        folder: submitit's folder (its pickles and the SLURM logs).
        partition, account: SLURM partition and account (None: the cluster's defaults).
        gpus_per_job: GPUs of a job whose ``Job.gpus`` says nothing more (``Job.gpus`` wins when larger).
        cpus, mem_gb, time_min: per job; a job that runs out of time is requeued and resumes.
        extra: further sbatch options (``{"qos": "high", "constraint": "a100"}``).
        max_jobs: jobs submitted and not finished at a time (None: no limit).
        array_parallelism: SLURM array tasks running at a time.
    """

    def __init__(self, folder: str | Path, cluster: str = "slurm", partition: str | None = None,
                 gpus_per_job: int = 1, cpus: int = 8, mem_gb: float | None = None, time_min: int = 24 * 60,
                 account: str | None = None, extra: Mapping[str, Any] | None = None, max_jobs: int | None = None,
                 array_parallelism: int = 256) -> None:
        if cluster not in ("slurm", "local"):
            raise ConfigError(f"cluster must be 'slurm' or 'local', got {cluster!r}")
        self.folder = Path(folder).resolve()
        self.cluster = cluster
        self.partition, self.account = partition, account
        self.gpus_per_job, self.cpus, self.mem_gb, self.time_min = int(gpus_per_job), int(cpus), mem_gb, int(time_min)
        self.extra = dict(extra or {})
        self.max_jobs = max_jobs
        self.array_parallelism = int(array_parallelism)
        self._outstanding = 0
        self._reserved = 0

    def _gpus(self, job: Job) -> int:
        return max(self.gpus_per_job, int(job.gpus)) if self.cluster == "slurm" else 0

    def parameters(self, job: Job) -> dict[str, Any]:
        """submitit's parameters of ``job`` (the generic names; ``slurm_*`` for the cluster's own)."""
        params: dict[str, Any] = {"name": job.name.replace("/", "."), "timeout_min": self.time_min,
                                  "cpus_per_task": max(self.cpus, int(job.cpus)), "tasks_per_node": 1, "nodes": 1}
        if self._gpus(job):
            params["gpus_per_node"] = self._gpus(job)
        if self.mem_gb is not None:
            params["mem_gb"] = self.mem_gb
        if self.cluster == "slurm":
            params["slurm_array_parallelism"] = self.array_parallelism
            if self.partition:
                params["slurm_partition"] = self.partition
            if self.account:
                params["slurm_account"] = self.account
            if self.extra:
                params["slurm_additional_parameters"] = dict(self.extra)
        return params

    def describe(self, job: Job) -> str:
        """The ``#SBATCH`` lines submitit writes for ``job`` (without submitting anything)."""
        from submitit.slurm.slurm import _make_sbatch_string

        gpus = self._gpus(job) or max(self.gpus_per_job, int(job.gpus))
        text = _make_sbatch_string(command="python -u -m submitit.core._submit", folder=self.folder / "%j",
                                   job_name=job.name.replace("/", "."), partition=self.partition,
                                   time=self.time_min, cpus_per_task=max(self.cpus, int(job.cpus)),
                                   gpus_per_node=gpus or None, ntasks_per_node=1, nodes=1,
                                   mem=f"{self.mem_gb}GB" if self.mem_gb is not None else None,
                                   account=self.account, additional_parameters=self.extra or None)
        return "\n".join(x for x in text.splitlines() if x.startswith("#SBATCH"))

    def capacity(self, job: Job) -> bool:
        return self.max_jobs is None or self._outstanding + self._reserved < self.max_jobs

    def reserve(self, job: Job) -> None:
        self._reserved += 1

    def submit(self, graph: Any, names: Sequence[str]) -> dict[str, Any]:
        """Submit ``names``; jobs of equal parameters go together as one job array."""
        import submitit

        groups: dict[str, list[str]] = {}
        for name in names:
            key = repr(sorted((k, v) for k, v in self.parameters(graph.jobs[name]).items() if k != "name"))
            groups.setdefault(key, []).append(name)
        handles: dict[str, Any] = {}
        for group in groups.values():
            ex = submitit.AutoExecutor(folder=self.folder / "%j", cluster=self.cluster)
            params = self.parameters(graph.jobs[group[0]])
            if len(group) > 1:
                params["name"] = f"{params['name']}+{len(group) - 1}"
            ex.update_parameters(**params)
            payloads = [graph.payload(n) for n in group]
            jobs = []
            if len(group) > 1:
                with ex.batch():
                    for p in payloads:
                        jobs.append(ex.submit(_SubmititCall(), p))
            else:
                jobs.append(ex.submit(_SubmititCall(), payloads[0]))
            for name, job in zip(group, jobs):
                handles[name] = _Tracked(job, self)
                self._outstanding += 1
        self._reserved = 0
        return handles


class _Tracked:
    """A submitit job, counted out of the executor's outstanding jobs when it is collected."""

    def __init__(self, job: Any, owner: SlurmExecutor) -> None:
        self.job, self.owner, self._collected = job, owner, False

    def done(self) -> bool:
        return self.job.done()

    def result(self) -> Any:
        try:
            return self.job.result()
        finally:
            if not self._collected:
                self._collected = True
                self.owner._outstanding -= 1
