"""Library behind ``tools/visualize.py`` and ``tools/gc_probe.py`` (the scripts only parse arguments).

- :mod:`tools.vis.loading`: rebuild a pre-training checkpoint's model from its own config; pick
  checkpoints of a run; load the shapes to draw.
- :mod:`tools.vis.forward`: the inference passes on a model (GC scores and the GM3D mask of a cloud,
  the masked forward that reconstructs patches or gives the GC training target).
- :mod:`tools.vis.panels`: score colours and the matplotlib figures of the ``gc`` and ``recon`` views.
- :mod:`tools.vis.curves`: training curves from a run's ``metrics.jsonl``.
- :mod:`tools.vis.evaluator`: :class:`~tools.vis.evaluator.GCPanelEvaluator`, the periodic training hook.
- :mod:`tools.vis.probe`: rank correlations of the teacher's GC scores with per-patch quantities.

Nothing is imported here, so loading one sub-module does not pull in matplotlib.
"""
