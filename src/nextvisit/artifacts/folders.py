"""Output folders: every stage writes its ``--out`` the same way (docs/interfaces.md, "Output folders").

- ``check_out(out, overwrite)`` before any work: takes the folder's lock (``claim``), then refuses a path that is a
  file, a non-empty folder unless ``overwrite``, and even then unless it holds the ``MARKER`` file (a folder
  nextvisit did not write, e.g. one holding the user's other files, is never replaced); a place the staging
  folder cannot be written (read-only, no permission) is refused.
- ``atomic_folder(out, overwrite)`` yields a temporary sibling folder (``.NAME.partial-PID``) to write into. On
  success the ``MARKER`` is added, the old ``out`` is moved aside (``.NAME.replaced-PID``), the temporary renamed
  into place and the old one removed; on any error the temporary is removed and ``out`` is untouched (a full disk
  is then a ``UserError`` naming ``out``). Nothing half-written is ever at ``out``: a process killed at any moment
  leaves there the old folder, the new one, or (killed between the two renames of an ``overwrite``) none, plus at
  most the hidden siblings, which the next run on ``out`` removes.
- ``staging_folder`` / ``publish`` are the same two steps apart, for stages whose worker processes write
  into the staging folder.
- ``atomic_write(path, write)`` writes one file through a sibling and a rename.

The lock: one process at a time writes ``out``. ``claim(out)`` holds an exclusive ``flock`` on ``.NAME.lock``
beside it (the file holds the PID); a second process is refused with a one-line ``UserError`` naming the folder
and the holder's PID. The kernel drops the lock when its process ends, however it ends (``kill -9`` too), so a
lock left by a dead process is simply taken over; the lock file is removed when the folder is published or
discarded. A stage holds its claim from ``check_out`` until ``publish`` or ``discard`` (the command line releases
any left at the end of a command, ``release_all``); a stage that writes its folder in place (``nextvisit
pretrain``'s run folder) holds it for its whole run with ``holding(out)``. Taking the claim removes what
interrupted runs left beside ``out`` (the hidden siblings above): while the lock is held, no other process can be
writing them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from nextvisit.errors import UserError

PARTIAL = ".partial-"  # marks a staging folder: ``.NAME.partial-PID`` beside ``NAME``
MARKER = ".nextvisit"  # in every folder a stage publishes: --overwrite replaces only folders that hold it
_MARKER_TEXT = '{"written_by": "nextvisit"}\n'  # the same bytes every time: outputs stay reproducible
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
REPLACED = ".replaced-"  # the old ``NAME`` during an overwrite: ``.NAME.replaced-PID``, removed once replaced
LOCK = ".lock"  # ``.NAME.lock`` beside ``NAME``: locked (flock) by the one process writing ``NAME``; holds its PID


@dataclass
class _Claim:
    fd: int  # the open lock file, flock-ed
    scoped: bool  # held by ``holding`` until its block ends (not released by publish / discard)


_claims: dict[Path, _Claim] = {}  # this process's claims, by resolved output path


def lock_path(out: Path) -> Path:
    """The lock file of ``out``: ``.NAME.lock`` beside it."""
    out = Path(out).resolve()
    return out.parent / f".{out.name}{LOCK}"


def claim(out: Path, scoped: bool = False) -> None:
    """Take the lock of ``out`` for this process (a no-op when it holds it already); a ``UserError`` naming the
    other process when one holds it. Then remove what interrupted runs left beside ``out``."""
    out = Path(out)
    key = out.resolve()
    if key in _claims:
        return
    lock = lock_path(key)
    try:
        key.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise UserError(f"{out}: {holder} is writing this folder now (lock {lock}); wait for it to "
                                f"finish or stop it, or choose another --out") from None
            # the holder may have released and removed the file between our open and flock: lock the new one
            if _same_file(fd, lock):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as exc:
        raise UserError(f"{out}: cannot write there ({exc.strerror}); choose a writable folder for --out") from None
    _claims[key] = _Claim(fd, scoped)
    _remove_leftovers(key)


def release(out: Path, scoped: bool = False) -> None:
    """Give up the lock of ``out`` (and remove its file); a claim taken with ``scoped`` is released only by
    ``scoped`` (the end of its ``holding`` block)."""
    key = Path(out).resolve()
    held = _claims.get(key)
    if held is None or (held.scoped and not scoped):
        return
    del _claims[key]
    # removed while still locked: a process that opened the old file retries on the new one (``claim``)
    Path(lock_path(key)).unlink(missing_ok=True)
    os.close(held.fd)


def release_all() -> None:
    """Give up every lock this process holds (the end of a command, whatever happened in it)."""
    for key in list(_claims):
        release(key, scoped=True)


@contextmanager
def holding(out: Path) -> Iterator[None]:
    """Hold the lock of ``out`` for the block (a folder written in place, e.g. a resumable run folder)."""
    key = Path(out).resolve()
    if key in _claims:
        yield
        return
    claim(out, scoped=True)
    try:
        yield
    finally:
        release(out, scoped=True)


def _holder(fd: int) -> str:
    """Who holds a lock file, from the PID it holds."""
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        text = ""
    return f"PID {text}" if text.isdigit() else "another process"


def _same_file(fd: int, path: Path) -> bool:
    try:
        mine, now = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def _remove_leftovers(out: Path) -> None:
    """Remove the staging and replaced siblings of ``out`` (``.NAME.partial-PID``, ``.NAME.replaced-PID``) that
    killed runs left; called with the lock held, so none of them is being written."""
    pattern = re.compile(re.escape(f".{out.name}") + f"({re.escape(PARTIAL)}|{re.escape(REPLACED)})[0-9]+$")
    for sibling in sorted(out.parent.iterdir()):
        if pattern.fullmatch(sibling.name):
            _remove(sibling)
            sys.stderr.write(f"removed {sibling}, left by an interrupted run\n")


def remove_partial_files(folder: Path) -> list[Path]:
    """Remove the ``.NAME.partial-PID`` files that killed ``atomic_write`` calls left in ``folder`` (a folder
    written in place, under ``holding``); returns them."""
    pattern = re.compile(f"[.].+{re.escape(PARTIAL)}[0-9]+")
    removed = [p for p in sorted(Path(folder).iterdir()) if pattern.fullmatch(p.name)]
    for path in removed:
        _remove(path)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def check_out(out: Path, overwrite: bool) -> None:
    """Take the lock of ``out`` (``claim``), then refuse it when it is a file, a non-empty folder without
    ``overwrite`` or without the ``MARKER``, or a place whose staging folder could not be written; call before
    the work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is a file; give a folder path for --out")
    _check_writable(out)
    claim(out)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            release(out)
            raise UserError(f"{out}: exists and is not empty; choose another --out or pass --overwrite to replace it")
        if not (out / MARKER).is_file():
            release(out)
            raise UserError(f"{out}: not a folder nextvisit wrote (no {MARKER} marker), so --overwrite will not "
                            "replace it; choose another --out, or empty or remove it yourself")


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
    """``check_out``, then a fresh empty staging folder beside ``out``."""
    out = Path(out)
    check_out(out, overwrite)
    staging = out.resolve().parent / f".{out.name}{PARTIAL}{os.getpid()}"
    try:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    except OSError as exc:
        release(out)
        raise UserError(f"{out}: cannot write there ({exc.strerror}); choose a writable folder for --out") from None
    return staging


def publish(staging: Path, out: Path) -> Path:
    """Mark the finished ``staging`` folder (``MARKER``), put it in place of ``out`` (if any), then release the
    lock of ``out``. Each step is a rename: ``out`` is never half-written (between the two renames it is absent,
    its old self beside it)."""
    out = Path(out)
    (Path(staging) / MARKER).write_text(_MARKER_TEXT)
    replaced = None
    if out.exists() or out.is_symlink():
        replaced = out.resolve().parent / f".{out.name}{REPLACED}{os.getpid()}"
        if replaced.exists():
            _remove(replaced)
        os.replace(out, replaced)
    os.replace(staging, out)
    if replaced is not None:
        _remove(replaced)
    release(out)
    return out


def discard(staging: Path, out: Path | None = None) -> None:
    """Remove an unfinished staging folder (and release the lock of ``out`` when given)."""
    shutil.rmtree(staging, ignore_errors=True)
    if out is not None:
        release(out)


@contextmanager
def atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces ``out``, on error it is removed and ``out`` untouched."""
    staging = staging_folder(out, overwrite)
    try:
        yield staging
        publish(staging, out)
    except BaseException as exc:
        discard(staging, out)
        if disk_full(exc):
            raise UserError(f"{out}: no space left on the device while writing it; free some space there or choose "
                            "another --out") from None
        raise


# Free space below which a failed write counts as a full disk even when its library words the error otherwise
# (torch.save reports a short write as "unexpected pos ..."): smaller than any checkpoint or output file.
_NEARLY_FULL_BYTES = 1 << 20


def disk_full(exc: BaseException, folder: Path | None = None) -> bool:
    """An error of a full disk or quota, from the OS or from a library that words it (polars, pyarrow); with
    ``folder``, also any write error while the file system holding it has (almost) no space left."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return True
    if isinstance(exc, Exception) and any(os.strerror(code) in str(exc) for code in _DISK_FULL):
        return True
    if folder is None or not isinstance(exc, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


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
