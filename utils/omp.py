"""The OpenMP wait policy of the entry scripts: passive by default, so a shared CPU degrades gracefully.

With the GNU OpenMP runtime's default policy, the threads of a parallel region spin while they wait
for their siblings. When another process shares the cores, a descheduled sibling makes every other
thread spin through its time slice, and a 2-thread run becomes several times slower (bench/README.md,
"OpenMP wait policy"). ``OMP_WAIT_POLICY=PASSIVE`` makes waiting threads sleep instead; on an idle
machine it costs little (measured in the same section).

The runtime reads the variable once, when it is loaded (at ``import torch``), so every entry script
calls :func:`apply_wait_policy` before anything imports torch. The rule:

* ``OMP_WAIT_POLICY`` already set (``PASSIVE`` or ``ACTIVE``): respected, nothing changes;
* otherwise ``GEOMASK3D_OMP_WAIT`` chooses: ``passive`` (the default) sets ``OMP_WAIT_POLICY=PASSIVE``;
  ``default`` leaves the variable unset, i.e. the runtime's own spinning default.

Child processes (DataLoader workers, ``torchrun`` ranks) inherit the environment.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

__all__ = ["CHOICE_VAR", "apply_wait_policy"]

CHOICE_VAR = "GEOMASK3D_OMP_WAIT"
_CHOICES = ("passive", "default")


def apply_wait_policy(environ: MutableMapping[str, str] | None = None) -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose otherwise (see the module docstring).

    Args:
        environ: the environment to read and change (default ``os.environ``).

    Returns:
        A short description of the policy in effect, for the run log.

    Raises:
        ValueError: ``GEOMASK3D_OMP_WAIT`` is neither ``passive`` nor ``default``.
    """
    env = os.environ if environ is None else environ
    if env.get("OMP_WAIT_POLICY"):
        return f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']} (set by the user)"
    choice = env.get(CHOICE_VAR, "passive").strip().lower() or "passive"
    if choice not in _CHOICES:
        raise ValueError(f"{CHOICE_VAR}={env[CHOICE_VAR]!r}: expected one of {', '.join(_CHOICES)}")
    if choice == "default":
        return f"OMP_WAIT_POLICY unset: the OpenMP runtime's default ({CHOICE_VAR}=default)"
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    late = environ is None and "torch" in sys.modules
    return "OMP_WAIT_POLICY=PASSIVE (project default)" + (
        "; too late for this process: torch was imported first" if late else "")
