"""Intra-op CPU threads lent to a running job from outside its process (a thread lease).

A scheduler that runs several single-threaded jobs side by side (the quickstart's stage workers)
has idle cores whenever fewer jobs are ready than it has workers. It can lend them to a running job
by writing the thread count that job may use into a small file; the job names the file in
``MEGATRON_KD_THREAD_LEASE`` and :class:`ThreadLease` re-reads it between optimizer steps (the
:class:`~megatron_kd.training.loop.Trainer` polls it), calling ``torch.set_num_threads`` when it
changed. OpenMP keeps the thread count per calling thread, so the switch has to happen on the
training thread itself: a background watcher could not do it.

Only jobs whose numbers do not depend on their thread count may be lent threads (the scheduler
decides: the quickstart lends to pre-training stages, which a test trains bit-identically at 1 and 2
threads); the lease changes speed, never results. Without the variable nothing is read.
Importing this module needs only the standard library (the scheduler side has no torch).
"""
from __future__ import annotations

import os
from pathlib import Path

LEASE_ENV = "MEGATRON_KD_THREAD_LEASE"
"""Environment variable naming the lease file (one integer: the torch intra-op threads to use)."""


def write_lease(path: str | Path, threads: int) -> None:
    """Grant ``threads`` (>= 1) intra-op threads to the job reading ``path`` (atomic replace: a
    reader sees the old or the new count, never a partial file)."""
    if threads < 1:
        raise ValueError(f"thread lease {path}: threads must be >= 1, got {threads}")
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(f"{int(threads)}\n", encoding="utf-8")
    os.replace(tmp, path)


class ThreadLease:
    """Follows a lease file: :meth:`poll` sets torch's intra-op threads to the count in it.

    ``path`` defaults to ``$MEGATRON_KD_THREAD_LEASE`` (no variable: every call is a no-op). A
    missing, empty or malformed file leaves the thread count as it is (the scheduler may not have
    written it yet). :meth:`restore` goes back to the count found at construction.
    """

    def __init__(self, path: str | Path | None = None):
        import torch

        env = os.environ.get(LEASE_ENV)
        self.path: Path | None = Path(path) if path is not None else (Path(env) if env else None)
        self.base = torch.get_num_threads()
        self.current = self.base
        self._stamp: tuple[int, int] | None = None

    @property
    def active(self) -> bool:
        return self.path is not None

    def poll(self) -> int:
        """Apply the lease file's thread count if the file changed since the last call; return the
        thread count in force. Costs one ``stat`` when nothing changed."""
        if self.path is None:
            return self.current
        try:
            st = self.path.stat()
        except OSError:
            return self.current
        stamp = (st.st_mtime_ns, st.st_ino)  # os.replace gives a new inode even within one mtime tick
        if stamp == self._stamp:
            return self.current
        self._stamp = stamp
        try:
            threads = int(self.path.read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            return self.current
        if threads >= 1 and threads != self.current:
            self._set(threads)
        return self.current

    def restore(self) -> None:
        """Back to the thread count the process had when the lease was created."""
        if self.current != self.base:
            self._set(self.base)

    def _set(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.current = threads
