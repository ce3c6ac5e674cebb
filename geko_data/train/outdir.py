"""One training run per output dir: a lock file held for the whole run, claimed by rank 0 for every rank."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator

import filelock
import torch

from geko_data.atomic import atomic_write_bytes
from geko_data.world import World

__all__ = ["LOCK_NAME", "PID_NAME", "OutputDirBusyError", "claim_output_dir", "lock_output_dir"]

LOCK_NAME = ".geko-train.lock"
PID_NAME = ".geko-train.lock.pid"  # who holds the lock, for the error another run gets


class OutputDirBusyError(RuntimeError):
    """Another process holds the output dir's lock: two runs writing one output dir delete each other's files."""


def _holder(output_dir: str) -> str:
    """Who holds the lock, from the pid file next to it (its holder writes it right after locking)."""
    pid_file = os.path.join(output_dir, PID_NAME)
    for _ in range(20):  # the holder may have the lock but not yet its pid file written
        try:
            with open(pid_file, encoding="utf-8") as f:
                pid, _, host = f.read().strip().partition(" ")
            return f"pid {pid} on host {host}" if host else f"pid {pid}"
        except OSError:
            time.sleep(0.05)
    return "its pid is not recorded"


@contextlib.contextmanager
def lock_output_dir(output_dir: str) -> Iterator[str]:
    """Hold ``output_dir``'s lock for the body; yield the lock file's path.

    Two runs on one output dir would prune, clear and overwrite each other's checkpoints: the second
    raises ``OutputDirBusyError`` at once, naming the dir and the holder's pid. The lock is an OS file lock
    (``filelock``): a run that is killed releases it with its process, so no stale lock is left behind.
    ``output_dir`` must exist.
    """
    lock_path = os.path.join(output_dir, LOCK_NAME)
    lock = filelock.FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise OutputDirBusyError(f"`output_dir` {output_dir!r} is in use by another training run "
                                 f"({_holder(output_dir)}; lock file {lock_path}); wait for it to finish or "
                                 f"use another output_dir") from None
    pid_file = os.path.join(output_dir, PID_NAME)
    try:
        atomic_write_bytes(pid_file, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield lock_path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(pid_file)
        lock.release()


@contextlib.contextmanager
def claim_output_dir(output_dir: str, world: World, device: torch.device) -> Iterator[None]:
    """Rank 0 makes ``output_dir`` and holds its lock for the body; the other ranks never touch it.

    Every rank learns whether rank 0 succeeded: a rank 0 that raised alone would leave the others waiting
    in their first collective call.
    """
    error: Exception | None = None
    with contextlib.ExitStack() as stack:
        if world.is_main:
            try:
                try:
                    os.makedirs(output_dir, exist_ok=True)
                except OSError as e:
                    raise PermissionError(f"`output_dir` {output_dir!r} cannot be created "
                                          f"({e.strerror or e})") from None
                if not os.access(output_dir, os.W_OK):
                    raise PermissionError(f"`output_dir` {output_dir!r} is not writable")
                stack.enter_context(lock_output_dir(output_dir))
            except Exception as e:  # noqa: BLE001 (OutputDirBusyError and anything else: the others must hear)
                error = e
        if world.world_size > 1:
            failed = torch.tensor([int(error is not None)], device=device)
            torch.distributed.broadcast(failed, src=0)
            if failed.item() and not world.is_main:
                raise RuntimeError(f"rank 0 could not claim `output_dir` {output_dir!r}; its error says why")
        if error is not None:
            raise error
        yield
