"""Backend selection for the point ops: optional accelerators behind a guarded import.

The environment variable ``GM3D_OPS`` picks the policy, read on every call:

* ``auto`` (default, also when unset): use an accelerator only where it returns exactly what the
  reference returns. No installed accelerator qualifies today, so every op runs the reference.
* ``fast``: also use accelerators that agree with the reference except on exact distance ties.
* ``reference``: the plain-PyTorch reference for every op.

The one accelerator is ``torch-quickfps`` (``pip install --no-deps torch-quickfps==2.1.0``, MIT, a
prebuilt abi3 wheel, CPU kernels; ``torch-quickfps-cu130`` / ``-cu128``, matched to torch's CUDA
build, add CUDA kernels) for :func:`fps`: 2-5x faster than the reference on the CPU and 1.5-4x on an
H200 (``bench/ops.py``). Started at index 0 (its default start is random) it returns the
reference indices for clouds without exact distance ties, but on ties (duplicated points, lattice
clouds) its bucket search may choose a different, equally far point, and when ``npoint`` exceeds the
number of distinct points it does not repeat index 0. It therefore cannot be made identical to the
reference's lowest-index tie rule and is used only under ``GM3D_OPS=fast``. Before first use on a
device type it is checked against the reference on a random cloud; a failure there, or any exception
later, falls back to the reference with one logged warning.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

import torch
from torch import Tensor

from extensions.pointops import reference
from utils.errors import ConfigError

_log = logging.getLogger(__name__)

ENV_VAR = "GM3D_OPS"
MODES = ("auto", "fast", "reference")

_quickfps: ModuleType | None = None
_quickfps_loaded = False
_quickfps_ok: dict[str, bool] = {}


def mode() -> str:
    """The backend policy from ``GM3D_OPS``: ``"auto"``, ``"fast"`` or ``"reference"``."""
    value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if value not in MODES:
        raise ConfigError(f"environment variable {ENV_VAR}={value!r} is not one of {', '.join(MODES)}")
    return value


def load_quickfps() -> ModuleType | None:
    """Import ``torch_quickfps`` once; None (and one info line) when it cannot be imported."""
    global _quickfps, _quickfps_loaded
    if not _quickfps_loaded:
        _quickfps_loaded = True
        try:
            import torch_quickfps
        except Exception as exc:  # noqa: BLE001 - missing wheel, ABI mismatch, missing shared library: all optional
            _log.info("torch-quickfps unavailable (%s: %s); fps uses the reference", type(exc).__name__, exc)
        else:
            _quickfps = torch_quickfps
    return _quickfps


def _quickfps_raw(xyz: Tensor, npoint: int) -> Tensor:
    module = load_quickfps()
    assert module is not None
    x = xyz.detach().to(reference.compute_dtype(xyz)).contiguous()
    return module.sample_idx(x, npoint, start_idx=0).long()


def _quickfps_usable(device: torch.device) -> bool:
    """Whether quickfps imports and reproduces the reference on a probe cloud on this device type."""
    if load_quickfps() is None:
        return False
    kind = device.type
    if kind not in _quickfps_ok:
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(2, 257, 3, generator=generator).to(device)
        try:
            ok = torch.equal(_quickfps_raw(probe, 33), reference.fps(probe, 33))
        except Exception as exc:  # noqa: BLE001 - an op without a kernel for this device, or a broken build
            _log.warning("torch-quickfps failed its probe on %s (%s); fps uses the reference", kind, exc)
            ok = False
        else:
            if not ok:
                _log.warning(
                    "torch-quickfps disagrees with the reference on %s; fps uses the reference", kind
                )
        _quickfps_ok[kind] = ok
    return _quickfps_ok[kind]


def fps_backend(device: torch.device | str) -> str:
    """Name of the backend :func:`fps` uses for tensors on ``device``: ``"quickfps"`` or ``"reference"``."""
    if mode() == "fast" and _quickfps_usable(torch.device(device)):
        return "quickfps"
    return "reference"


def fps(xyz: Tensor, npoint: int) -> Tensor:
    """Farthest point sampling through the selected backend; see :func:`reference.fps`."""
    reference.check_points(xyz, "xyz", "fps")
    if 1 <= npoint <= xyz.shape[1] and fps_backend(xyz.device) == "quickfps":
        try:
            return _quickfps_raw(xyz, npoint)
        except Exception as exc:  # noqa: BLE001 - never let the optional accelerator break a run
            _log.warning("torch-quickfps failed (%s); fps falls back to the reference", exc)
            _quickfps_ok[xyz.device.type] = False
    return reference.fps(xyz, npoint)


def backends(device: torch.device | str = "cpu") -> dict[str, str]:
    """Backend name per public op for tensors on ``device`` under the current ``GM3D_OPS``."""
    fps_name = fps_backend(device)
    return {
        "fps": fps_name,
        "knn": "reference",
        "gather": "reference",
        "group": f"fps={fps_name}, knn=reference",
        "chamfer_l2": "reference",
        "chamfer_l1": "reference",
        "emd": "reference (scipy linear_sum_assignment)",
    }
