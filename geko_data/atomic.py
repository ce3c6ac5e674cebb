"""Atomic file and directory writes: nothing half-written is ever visible under its final name.

A write goes to a temporary name in the same folder, is fsynced, then
``os.replace``d over the target, and the folder is fsynced so the rename
itself survives a power cut (SQLite's rollback-journal discipline, minus the
journal: the old file stays whole until the new one is).

A temporary name carries the writer's host and pid (``.state.arrow.HOST-PID.XXXXXXXX.tmp``), so the next
write of the same target can tell a killed writer's leftover from a file still being written, and
remove it: leftovers no longer pile up.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator

__all__ = ["atomic_dir", "atomic_path", "atomic_write_bytes", "fsync_dir", "fsync_file", "remove_stale_temps"]

#: A leftover temp file of another host (whose pids cannot be checked from here), or of a writer from before
#: pids were in the names, is removed once it has not been modified for this long: no save takes an hour.
STALE_SECONDS = 3600.0
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that renames inside it are durable (a no-op where the OS refuses)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temps(path: str | os.PathLike, *, now: float | None = None) -> list[str]:
    """Remove the temp files killed writers of ``path`` left beside it; return their names.

    Only names of ``path``'s own pattern are considered (``.NAME.HOST-PID.XXXXXXXX.tmp``), and of those
    only files whose writer is gone: on this host, its pid is not running; from another host (or an older
    writer without a pid in the name), not modified for ``STALE_SECONDS``.
    """
    path = os.path.abspath(os.fspath(path))
    folder, base = os.path.split(path)
    pattern = re.compile(r"^\." + re.escape(base) + r"\.(?:(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.)?[a-z0-9_]{8}\.tmp$")
    now = time.time() if now is None else now
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if m is None:
            continue
        full = os.path.join(folder, name)
        try:
            st = os.lstat(full)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if m["pid"] is not None and m["host"] == _HOST:
            gone = int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"]))
        else:
            gone = now - st.st_mtime > STALE_SECONDS
        if gone:
            with contextlib.suppress(OSError):
                os.unlink(full)
                removed.append(name)
    return removed


def _resolve(path: str | os.PathLike) -> str:
    """The absolute file a write of ``path`` replaces: a symlink's final target (written through), else
    ``path``."""
    path = os.path.abspath(os.fspath(path))
    return os.path.realpath(path) if os.path.islink(path) else path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, through_links: bool = True) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    On any exception (including KeyboardInterrupt) the temporary file is removed and ``path`` is untouched.
    A symlink at ``path`` is written through: its target is replaced and the link kept; with
    ``through_links=False`` the link itself is replaced (a rename never follows it, so no check can be
    raced), for files written into a folder someone else may control. A file that exists keeps its
    permission bits (a 0600 file stays 0600); a new one gets 0666 minus the umask. Temp files that killed
    writers of the same target left are removed first (``remove_stale_temps``).
    """
    path = _resolve(path) if through_links else os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path!r}: folder {folder!r} does not exist")
    remove_stale_temps(path)
    try:
        st = os.stat(path) if through_links else os.lstat(path)
        mode = stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else 0o666 & ~_umask()
    except FileNotFoundError:
        mode = 0o666 & ~_umask()  # mkstemp makes 0600; a new file should look like any other
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{_HOST}-{os.getpid()}.", suffix=".tmp",
                               dir=folder)
    os.close(fd)
    os.chmod(tmp, mode)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary directory beside ``path``; on success fsync its files and rename it to ``path``.

    ``path`` must not exist yet (a complete directory is never overwritten); its parent folders are made
    when missing. A crash leaves only a hidden ``.tmp`` directory that readers ignore.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if os.path.exists(path):
        raise FileExistsError(f"cannot write {path!r}: it already exists")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                fsync_file(os.path.join(root, name))
            fsync_dir(root)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)
