"""Library behind ``tools/visualize.py`` and ``tools/gc_probe.py`` (the scripts only parse arguments).

- :mod:`tools.vis.loading`: rebuild a pre-training checkpoint's model from its own config; pick
  checkpoints of a run; load the shapes to draw.
- :mod:`tools.vis.forward`: the inference passes on a model (GC scores and the GM3D mask of a cloud,
  the masked forward that reconstructs patches or gives the GC training target).
- :mod:`tools.vis.panels`: score colours and the matplotlib figures of the ``gc`` and ``recon`` views.
- :mod:`tools.vis.curves`: training curves from a run's ``metrics.jsonl``.
- :mod:`tools.vis.evaluator`: the periodic training hooks, :class:`~tools.vis.evaluator.GCPanelEvaluator`
  (figures) and :class:`~tools.vis.evaluator.ProbeEvaluator` (diagnostics as metrics).
- :mod:`tools.vis.probe`: rank correlations of the teacher's GC scores with per-patch quantities.
- :mod:`tools.vis.diagnostics`: is a scorer content-blind (content shuffle, rotation, training target
  against a position-only baseline, teacher vs student BatchNorm statistics).

Nothing is imported here, so loading one sub-module does not pull in matplotlib.
"""
