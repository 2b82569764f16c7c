"""Helpers of the fault-injection tests: run a command, kill it at a chosen moment (SIGKILL or
SIGTERM, to the process group or the main pid), and check what a killed run leaves behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "megatron_kd"]
EXIT_REQUEUE = 75


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run(args: list[str], timeout: float = 600, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """``megatron-kd <args>`` to completion (no check)."""
    return subprocess.run(CLI + args, env=env(), capture_output=True, text=True, timeout=timeout, cwd=cwd)


def wait_until(cond: Callable[[], bool], proc: subprocess.Popen, timeout: float = 600, poll: float = 0.02) -> bool:
    """Poll ``cond`` until it holds (True) or ``proc`` ends first (False)."""
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            return cond()
        assert time.time() < deadline, "timed out waiting for the fault-injection point"
        time.sleep(poll)
    return True


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill(proc: subprocess.Popen, sig: int, group: bool) -> list[psutil.Process]:
    """Send ``sig`` to the main pid or its whole process group; returns the descendants seen just before."""
    children = descendants(proc.pid)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    return children


def start(args: list[str], cwd: str | Path | None = None) -> subprocess.Popen:
    """``megatron-kd <args>`` in its own process group (as under a scheduler)."""
    return subprocess.Popen(CLI + args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=cwd)


def assert_no_orphans(children: list[psutil.Process], timeout: float = 20.0) -> None:
    """Every process in ``children`` is gone (they die with their parent)."""
    deadline = time.time() + timeout
    alive = children
    while alive and time.time() < deadline:
        alive = [c for c in alive if _alive(c)]
        time.sleep(0.1)
    assert not alive, f"orphaned processes: {[(c.pid, _cmdline(c)) for c in alive]}"


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:120]
    except psutil.Error:
        return "?"


def stale_files(root: str | Path) -> list[str]:
    """Temporary files/directories a killed run could leave under ``root``."""
    return sorted(str(path.relative_to(root)) for path in Path(root).rglob("*") if is_stale_name(path.name))


def is_stale_name(name: str) -> bool:
    """A temp/staging name a killed or failed writer leaves (``iter_N.tmp``, ``.x.tmp-<pid>-…``, ``.old``)."""
    return name.endswith((".tmp", ".old")) or ".tmp." in name or ".tmp-" in name or name.startswith(".staging")


def records(metrics: str | Path) -> list[dict]:
    with open(metrics, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def step_keys(metrics: str | Path) -> list[tuple[int, str]]:
    """``(step, split)`` of every record, in file order."""
    return [(r["step"], r["split"]) for r in records(metrics)]


def assert_unique_steps(metrics: str | Path) -> None:
    keys = step_keys(metrics)
    assert len(keys) == len(set(keys)), f"duplicate metric lines: {keys}"


def losses(metrics: str | Path, split: str = "train", key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in records(metrics) if r["split"] == split}


def kill_at_random(proc: subprocess.Popen, ready: Callable[[], bool], sig: int, group: bool, seed: int,
                   max_delay: float = 1.5) -> list[psutil.Process] | None:
    """Once ``ready()`` holds, wait a seeded random 0..max_delay s, then send ``sig``; returns the
    descendants seen just before (None when the process finished first)."""
    import random

    if not wait_until(ready, proc):
        return None
    time.sleep(random.Random(seed).uniform(0, max_delay))
    if proc.poll() is not None:
        return None
    return kill(proc, sig, group)


def tree_bytes(root: str | Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), minus names containing one of ``skip``."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(s in p.name for s in skip)}
