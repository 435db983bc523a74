"""The job-graph runner: runs of the entry points (pre-training, fine-tuning, few-shot, segmentation, SVM)
as a dependency graph, each in its own run folder, reused when finished, continued when killed.

* :mod:`tools.launch.jobs`: a :class:`~tools.launch.jobs.Job` (one run of an entry point), its identity,
  its state in its run folder, and :func:`~tools.launch.jobs.run_job`, which runs one job wherever it is
  sent (a thread here, a SLURM job through submitit);
* :mod:`tools.launch.graph`: :class:`~tools.launch.graph.Graph`, the dependency order, reuse, status;
* :mod:`tools.launch.executors`: where jobs run (local slots and GPUs, or SLURM through submitit);
* :mod:`tools.launch.study` and :mod:`tools.launch.table`: studies (cfgs/reproduce/*.yaml) and their tables.

The package sits above the engine and the tasks: it starts entry points as subprocesses and reads the
files they write; nothing below imports it.
"""
