"""Part segmentation: the entry point ``segmentation/main.py`` (docs/SEGMENTATION.md).

The models live in ``models/`` (``models/point_mae_seg.py``), the runner, evaluator and voting in
``tools/tasks/segment.py``, the metrics in ``tools/tasks/seg_metrics.py``; training goes through ``tools/engine/trainer.py``.
"""
