"""Output folders: every stage writes its ``--out`` the same way.

- ``check_out(out, overwrite)`` before any work: a path that is a file is refused; a non-empty folder is
  refused unless ``overwrite``.
- ``atomic_folder(out, overwrite)`` yields a temporary sibling folder (``.NAME.partial-PID``) to write into. On
  success the old ``out`` is removed and the temporary renamed into place; on any error the temporary is
  removed and ``out`` is untouched. Nothing half-written is ever left at ``out``.
- ``staging_folder`` / ``publish`` are the same two steps apart, for stages whose worker processes write
  into the staging folder.
- ``atomic_write(path, write)`` writes one file through a sibling and a rename.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from nextvisit.errors import UserError

PARTIAL = ".partial-"  # marks a staging folder: ``.NAME.partial-PID`` beside ``NAME``


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse ``out`` when it is a file, or a non-empty folder without ``overwrite``; call before the work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is a file; give a folder path for --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: exists and is not empty; choose another --out or pass --overwrite to replace it")


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
    """Replace ``out`` (if any) by the finished ``staging`` folder."""
    out = Path(out)
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
    except BaseException:
        discard(staging)
        raise
    publish(staging, out)


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
