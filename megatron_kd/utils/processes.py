"""Child processes that die with their parent, and graceful-stop signal handling.

* :func:`set_parent_death_signal`: Linux ``prctl(PR_SET_PDEATHSIG)``: the kernel kills this
  process when its parent dies, even by SIGKILL (no orphaned workers).
* :func:`children_die_with_parent`: the same for every child *forked* from the main thread of
  this process from now on (megatron-core's checkpoint writers, fork-started pool and DataLoader
  workers); spawned children call :func:`set_parent_death_signal` themselves.
* :class:`StopSignals`: SIGTERM/SIGINT set a flag instead of killing the process, so a training
  loop can finish its step, checkpoint, and exit with ``EXIT_REQUEUE``.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1
_hook_installed = False
_fork_from_main = False
_forking_pid = 0


def set_parent_death_signal(sig: int = signal.SIGKILL, parent: int | None = None) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits (Linux only).

    Exits at once if the parent (``parent``: its pid when known) is already gone (the race
    between fork and this call). Returns True when the request was registered.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid() if parent is None else parent
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:
        os._exit(1)
    return True


def _before_fork() -> None:
    global _fork_from_main, _forking_pid
    _forking_pid = os.getpid()
    # PDEATHSIG fires when the *thread* that forked exits: only children of the main thread get it.
    _fork_from_main = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    if _fork_from_main:
        set_parent_death_signal(parent=_forking_pid)


def children_die_with_parent() -> None:
    """Every child forked from this process's main thread from now on dies with it (idempotent)."""
    global _hook_installed
    if _hook_installed or not hasattr(os, "register_at_fork"):
        return
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _hook_installed = True


class StopSignals:
    """Context manager: SIGTERM and SIGINT set :attr:`received` (the signal's name) instead of
    stopping the process. A second SIGINT raises ``KeyboardInterrupt`` (the impatient Ctrl-C).
    Outside the main thread it does nothing (Python only handles signals there)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
