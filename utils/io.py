"""Crash-safe file writes: the one atomic-write helper every module uses, and stale-temp clean-up.

``atomic_write(path, write_fn)`` writes through a temp file in the destination folder, flushes and
fsyncs it, gives it the permissions a plain ``open(path, "w")`` would have had (``0o666 & ~umask``;
``mkstemp`` alone creates ``0o600``), then renames it over ``path``. A reader therefore sees either the
old file or the complete new one, never a partial one. If the writer raises, the temp file is removed;
if the process is killed, the temp file (``.<name>.<random>.tmp``) stays behind and
:func:`remove_stale_temps` deletes it the next time the folder is opened by a run (docs/RELIABILITY.md).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

__all__ = ["TEMP_SUFFIX", "atomic_write", "current_umask", "remove_stale_temps", "temp_name_pattern"]

TEMP_SUFFIX = ".tmp"


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_name_pattern(name: str) -> str:
    """The glob matching the temp files :func:`atomic_write` creates for a destination called ``name``."""
    return f".{name}.*{TEMP_SUFFIX}"


def atomic_write(path: str | os.PathLike[str], write_fn: Callable[[IO[Any]], Any], *, binary: bool = True,
                 encoding: str = "utf-8", fsync: bool = True) -> Path:
    """Write ``path`` atomically: ``write_fn(file)`` fills a temp file that is then renamed over ``path``.

    Args:
        path: destination; missing parent folders are created.
        write_fn: called once with the open temp file (binary unless ``binary=False``).
        binary: open the temp file in binary mode (default) or text mode with ``encoding``.
        encoding: text encoding when ``binary=False``.
        fsync: fsync the temp file before the rename, so the new content survives a power loss.

    Returns:
        The destination path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding=encoding)) as fh:
            write_fn(fh)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temp files that killed :func:`atomic_write` calls left in ``folder`` (not recursive).

    Only call this on a folder no other live process writes into (a run folder under its lock).
    Returns the removed paths.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    removed = []
    for stale in sorted(root.glob(f".*{TEMP_SUFFIX}")):
        if stale.is_file() and not stale.is_symlink():
            try:
                size = stale.stat().st_size
                stale.unlink()
            except FileNotFoundError:
                continue
            removed.append(stale)
            log.warning("removed %s (%d bytes), a temp file left by a killed write", stale, size)
    return removed
