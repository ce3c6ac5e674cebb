"""Fetched byte ranges handed from the DataLoader worker that fetched them to the others that read them.

The bytes go through files in a folder in shared memory (``/dev/shm`` where there is one, else the temp
folder): the fetching worker writes a range once and hard-links it for every other worker that reads it;
each reader drops its link after its last use, so the memory is freed when the last reader is done.
The folder is named after the process that made it (``geko-ranges-HOST-PID-XXXXXX``); a process killed
before it could remove its folder leaves it behind, and the next ``range_dir()`` on this host removes
every such folder whose process is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
import weakref

from geko_data.atomic import _HOST, _pid_alive
from geko_data.shards import ShardError

__all__ = ["Handover", "range_dir", "remove_stale", "shared_root"]

_PREFIX = "geko-ranges-"
_NAME = re.compile(re.escape(_PREFIX) + r"(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def shared_root() -> str:
    """Where range folders go: /dev/shm (shared memory) where it is writable, else the temp folder."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else tempfile.gettempdir()


def remove_stale(root: str) -> list[str]:
    """Remove the range folders under ``root`` left by processes of this host that are gone."""
    removed = []
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            m = _NAME.match(name)
            if m and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                removed.append(name)
    return removed


def range_dir(owner: object, root: str | None = None) -> str:
    """A new folder for the hand-over, removed when ``owner`` is garbage-collected or the process exits
    (and, when the process is killed, by the next call on this host)."""
    root = root or shared_root()
    remove_stale(root)
    path = tempfile.mkdtemp(prefix=f"{_PREFIX}{_HOST}-{os.getpid()}-", dir=root)
    weakref.finalize(owner, shutil.rmtree, path, True)
    return path


class Handover:
    """The files of one epoch plan (``tag``) in ``folder``, as seen by worker ``worker``.

    ``wait``: seconds a reader waits for a range before it gives up on the hand-over (the caller then
    fetches the range itself).
    """

    def __init__(self, *, folder: str, tag: str, worker: int, wait: float) -> None:
        self.folder, self.tag, self.worker, self.wait = folder, tag, worker, wait

    def _name(self, r: int, what: str) -> str:
        return os.path.join(self.folder, f"{self.tag}-{r}.{what}")

    def deliver(self, r: int, data: bytes | None, error: str | None, readers: set[int]) -> None:
        """Hand range ``r``'s bytes (or its error) to every worker in ``readers`` but this one."""
        others = sorted(readers - {self.worker})
        if not others:
            return
        tmp = self._name(r, f"tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data if error is None else error.encode())
        if error is not None:
            os.replace(tmp, self._name(r, "err"))
            return
        for w in others:
            os.link(tmp, self._name(r, f"w{w}"))
        os.unlink(tmp)

    def take(self, r: int) -> bytes | ShardError | None:
        """Range ``r``'s bytes or error, waiting (bounded) for the worker that fetches it; None if it did not
        come within ``wait`` seconds."""
        mine, err = self._name(r, f"w{self.worker}"), self._name(r, "err")
        deadline, pause = time.monotonic() + self.wait, 0.0002
        while True:
            try:
                with open(mine, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                pass
            if os.path.exists(err):
                with open(err, "rb") as f:
                    return ShardError(f.read().decode("utf-8", "replace"))
            if time.monotonic() > deadline:
                return None
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    def release(self, r: int) -> None:
        """Drop this worker's link to range ``r`` (read for the last time)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._name(r, f"w{self.worker}"))

    def clear(self) -> None:
        """Remove every file of the folder (ranges an epoch cut short left behind)."""
        with contextlib.suppress(OSError):
            for name in os.listdir(self.folder):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.folder, name))
