"""Part segmentation on ShapeNetPart (not built yet).

The ShapeNetPart loader (``datasets/shapenetpart.py``, 16 categories / 50 parts, deterministic test
sampling) and the per-point part labels of the default ``SyntheticShapes`` data are in place; the
segmentation head and its entry point will reuse ``models/`` and ``tools/engine.py`` when built.
"""
