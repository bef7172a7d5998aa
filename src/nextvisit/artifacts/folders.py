"""Output folders: every stage writes its ``--out`` the same way.

- ``check_out(out, overwrite)`` before any work: a path that is a file is refused; a non-empty folder is
  refused unless ``overwrite``, and even then unless it holds the ``MARKER`` file (a folder nextvisit did not
  write, e.g. one holding the user's other files, is never replaced); a place the staging folder cannot be
  written (read-only, no permission) is refused.
- ``atomic_folder(out, overwrite)`` yields a temporary sibling folder (``.NAME.partial-PID``) to write into. On
  success the ``MARKER`` is added, the old ``out`` is removed and the temporary renamed into place; on any error
  the temporary is removed and ``out`` is untouched (a full disk is then a ``UserError`` naming ``out``).
  Nothing half-written is ever left at ``out``.
- ``staging_folder`` / ``publish`` are the same two steps apart, for stages whose worker processes write
  into the staging folder.
- ``atomic_write(path, write)`` writes one file through a sibling and a rename.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from nextvisit.errors import UserError

PARTIAL = ".partial-"  # marks a staging folder: ``.NAME.partial-PID`` beside ``NAME``
MARKER = ".nextvisit"  # in every folder a stage publishes: --overwrite replaces only folders that hold it
_MARKER_TEXT = '{"written_by": "nextvisit"}\n'  # the same bytes every time: outputs stay reproducible
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse ``out`` when it is a file, a non-empty folder without ``overwrite`` or without the ``MARKER``, or
    a place whose staging folder could not be written; call before the work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is a file; give a folder path for --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: exists and is not empty; choose another --out or pass --overwrite to replace it")
        if not (out / MARKER).is_file():
            raise UserError(f"{out}: not a folder nextvisit wrote (no {MARKER} marker), so --overwrite will not "
                            "replace it; choose another --out, or empty or remove it yourself")
    _check_writable(out)


def _check_writable(out: Path) -> None:
    """The staging folder goes beside ``out``: refuse when the nearest existing folder there is read-only."""
    parent = Path(out).resolve().parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or os.access(existing, os.W_OK | os.X_OK):
        return
    read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    reason = os.strerror(errno.EROFS if read_only else errno.EACCES)
    raise UserError(f"{out}: cannot write there ({reason}); choose a writable folder for --out")


def staging_folder(out: Path, overwrite: bool) -> Path:
    """``check_out``, then a fresh empty staging folder beside ``out`` (a stale one of this process removed)."""
    out = Path(out)
    check_out(out, overwrite)
    staging = out.resolve().parent / f".{out.name}{PARTIAL}{os.getpid()}"
    try:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot write there ({exc.strerror}); choose a writable folder for --out") from None
    return staging


def publish(staging: Path, out: Path) -> Path:
    """Mark the finished ``staging`` folder (``MARKER``) and put it in place of ``out`` (if any)."""
    out = Path(out)
    (Path(staging) / MARKER).write_text(_MARKER_TEXT)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(staging, out)
    return out


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces ``out``, on error it is removed and ``out`` untouched."""
    staging = staging_folder(out, overwrite)
    try:
        yield staging
        publish(staging, out)
    except BaseException as exc:
        discard(staging)
        if _disk_full(exc):
            raise UserError(f"{out}: no space left on the device while writing it; free some space there or choose "
                            "another --out") from None
        raise


def _disk_full(exc: BaseException) -> bool:
    """An error of a full disk or quota, from the OS or from a library that words it (polars, pyarrow)."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return True
    return isinstance(exc, Exception) and any(os.strerror(code) in str(exc) for code in _DISK_FULL)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a sibling of ``path``, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{PARTIAL}{os.getpid()}")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
