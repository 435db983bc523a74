"""The engine every task runs on (nothing here imports ``tools.tasks``, ``tools.vis`` or ``tools.launch``).

* :mod:`tools.engine.trainer`: the one training loop (``Trainer``), devices, precision, DDP, exact resume.
* :mod:`tools.engine.recovery`: crash recovery of a run folder (derived files repaired from ``ckpt-last.pth``,
  the last good checkpoint after a non-finite loss).
* :mod:`tools.engine.optim`: parameter groups, optimisers, the learning-rate schedule.
* :mod:`tools.engine.checkpoint`: atomic save, safe load, RNG state.
* :mod:`tools.engine.runs`: run set-up (config, devices, DDP, checks before the run folder, its lock, config
  changes on resume) and ``run_cli``.
* :mod:`tools.engine.builders`: model (with GM3D's knowledge teacher), data and transforms from a config.
* :mod:`tools.engine.progress`: the progress bar / log lines; :mod:`tools.engine.cli`: command-line helpers.
"""
