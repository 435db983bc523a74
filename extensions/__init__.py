"""GeoMask3D extensions: point ops with plain-PyTorch references and optional accelerators.

Nothing here needs a compiler or a GPU; see :mod:`extensions.pointops` for the API and
:mod:`extensions.pointops.dispatch` for the ``GM3D_OPS`` backend policy.
"""

from extensions.pointops import (
    KNN,
    Patches,
    backends,
    chamfer_l1,
    chamfer_l2,
    emd,
    fps,
    gather,
    group,
    knn,
)

__all__ = [
    "KNN",
    "Patches",
    "backends",
    "chamfer_l1",
    "chamfer_l2",
    "emd",
    "fps",
    "gather",
    "group",
    "knn",
]
