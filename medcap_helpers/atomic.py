"""The one way medcap writes files and folders: to a temporary name beside the target, then rename.

* :func:`atomic_file` — a file appears complete or not at all (``os.replace``).
* :func:`atomic_folder` — a folder (a saved dataset, an adapter, a model) is built in a staging
  folder and swapped in. On Linux the swap is one ``renameat2(RENAME_EXCHANGE)`` call, so the target
  path always holds either the complete old folder or the complete new one. Where that call is
  missing, the old folder is first renamed to a backup name and :func:`recover_folder` (run before
  every read through :func:`folder_ready` and every write) puts it back if a crash fell between the
  two renames.

A process killed at any point leaves the old content intact, plus at most a staging folder that
the next write removes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UMASK = os.umask(0o022)
os.umask(_UMASK)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2() -> object | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()


def exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system cannot (then nothing changed)."""
    if _RENAMEAT2 is None:
        return False
    result = _RENAMEAT2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: filesystem or kernel without exchange
        return False
    raise OSError(errno, os.strerror(errno), str(first))


def _backup_of(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _staging_of(target: Path) -> Path:
    return target.with_name(f".{target.name}.staging")


def recover_folder(target: str | Path) -> None:
    """Undo a replacement a crash interrupted: restore the backup when the target is missing."""
    target = Path(target)
    backup = _backup_of(target)
    if backup.exists() and not target.exists():
        os.replace(backup, target)
    shutil.rmtree(backup, ignore_errors=True)


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; it becomes ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files owner-only; run files get normal permissions
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``target`` (see the module docstring)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(target)
    staging = _staging_of(target)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_folder(source: Path, target: Path) -> None:
    """Move the complete folder ``source`` onto ``target``; the old ``target`` is deleted afterwards."""
    if not target.exists():
        os.replace(source, target)
        return
    if exchange(source, target):  # target is new now, source holds the old content
        shutil.rmtree(source, ignore_errors=True)
        return
    backup = _backup_of(target)
    shutil.rmtree(backup, ignore_errors=True)
    os.replace(target, backup)
    os.replace(source, target)
    shutil.rmtree(backup, ignore_errors=True)


def folder_ready(target: str | Path, marker: str) -> bool:
    """True when ``target/marker`` exists, after recovering an interrupted replacement."""
    recover_folder(target)
    return (Path(target) / marker).is_file()


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return path
