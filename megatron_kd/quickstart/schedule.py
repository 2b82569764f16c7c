"""The quickstart's stage graph and its scheduler.

Every stage declares the stages it needs (:class:`StageSpec`). ``--workers 1`` runs them one after
another in this process; ``--workers N`` runs up to N at once, each in a worker process of its own
(:mod:`megatron_kd.quickstart.worker`: a fresh interpreter with a fixed torch thread count, started
once and fed one stage at a time). Among the stages whose inputs are ready, the one with the longest
remaining path to the end (its own estimated cost plus its longest chain of dependants: the teacher
first, then the teacher-dependent chains) starts first.

A stage computes from its inputs only (the markers under ``OUT/stages`` of the stages it needs) with
the same thread count in any mode, so any ``--workers`` gives the same numbers; the one exception
is a ``lendable`` stage (its numbers are the same at twice its thread count), which runs with twice
its threads while another worker has nothing ready (on 2 cores: the teacher, once the stages that
need no teacher are done). Workers die with the
parent (``PR_SET_PDEATHSIG``; each in its own process group, killed as a group when a stage fails or
the run is interrupted). A failing stage stops the run with its one-line error and the stage name.

This module imports only the standard library (the parent of a parallel run needs no torch).
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from megatron_kd.utils.processes import set_parent_death_signal
from megatron_kd.utils.threads import LEASE_ENV, write_lease


@dataclass(frozen=True)
class StageSpec:
    """One quickstart stage: its name, the stages it needs and its estimated cost."""

    name: str
    deps: tuple[str, ...] = ()
    cost: float = 1.0
    """Estimated seconds (relative weights: the `full` size, one thread); orders the ready stages
    (critical path first) and drives the ETA. Never changes what a stage computes."""
    lendable: bool = False
    """The stage computes the same bits at its thread count and at twice that (a test trains it at 1 and
    2), so a parallel run doubles its threads while another worker has nothing ready to run
    (:mod:`megatron_kd.utils.threads`); it uses them from its next optimizer step."""


class StageFailed(RuntimeError):
    """A stage raised (or its worker died): the run stops."""

    def __init__(self, stage: str, error: str, log: str | None = None):
        self.stage, self.error, self.log = stage, error, log
        where = f" (log: {log})" if log else ""
        super().__init__(f"stage {stage} failed: {error}{where}")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    """``--workers`` default: one single-threaded stage per usable core, at most 4 (beyond the teacher the
    graph rarely has more than four stages ready at once; on 2 cores: 2)."""
    return min(4, usable_cores())


def topological(specs: Iterable[StageSpec]) -> list[StageSpec]:
    """``specs`` in an order where every stage follows the stages it needs (stable: the given order
    where it already is one). Refuses unknown dependencies and cycles."""
    specs = list(specs)
    by_name = {s.name: s for s in specs}
    if len(by_name) != len(specs):
        raise ValueError("duplicate stage names")
    for s in specs:
        for d in s.deps:
            if d not in by_name:
                raise ValueError(f"stage {s.name} needs unknown stage {d}")
    out: list[StageSpec] = []
    placed: set[str] = set()
    while len(out) < len(specs):
        progress = False
        for s in specs:
            if s.name not in placed and all(d in placed for d in s.deps):
                out.append(s)
                placed.add(s.name)
                progress = True
        if not progress:
            raise ValueError(f"stage dependency cycle among {sorted(set(by_name) - placed)}")
    return out


def dependants(specs: Iterable[StageSpec]) -> dict[str, list[str]]:
    specs = list(specs)
    children: dict[str, list[str]] = {s.name: [] for s in specs}
    for s in specs:
        for d in s.deps:
            children[d].append(s.name)
    return children


def remaining_path(specs: Iterable[StageSpec], cost: dict[str, float] | None = None) -> dict[str, float]:
    """Per stage: its cost plus the costliest chain of stages that need it (the longest remaining
    path to the end, "upward rank"); ``cost`` overrides the estimates (e.g. 0 for finished stages)."""
    specs = topological(specs)
    children = dependants(specs)
    cost = cost or {}
    rank: dict[str, float] = {}
    for s in reversed(specs):
        rank[s.name] = cost.get(s.name, s.cost) + max((rank[c] for c in children[s.name]), default=0.0)
    return rank


def priority_order(specs: Iterable[StageSpec]) -> list[str]:
    """The order one worker runs the stages in: repeatedly the ready stage with the longest remaining path."""
    specs = topological(specs)
    rank = remaining_path(specs)
    done: set[str] = set()
    order: list[str] = []
    pending = list(specs)
    while pending:
        ready = [s for s in pending if all(d in done for d in s.deps)]
        best = max(ready, key=lambda s: rank[s.name])  # max() keeps the first of equals: the declared order
        order.append(best.name)
        done.add(best.name)
        pending.remove(best)
    return order


def critical_path(specs: Iterable[StageSpec], seconds: dict[str, float]) -> tuple[list[str], float]:
    """The chain of dependent stages with the largest sum of ``seconds`` (what bounds the wall time
    however many workers run): (stage names in order, their seconds)."""
    specs = topological(specs)
    best: dict[str, float] = {}
    prev: dict[str, str | None] = {}
    for s in specs:
        base, before = max(((best[d], d) for d in s.deps), default=(0.0, None))
        best[s.name] = base + float(seconds.get(s.name) or 0.0)
        prev[s.name] = before
    if not best:
        return [], 0.0
    end: str | None = max(best, key=lambda n: best[n])
    path: list[str] = []
    while end is not None:
        path.append(end)
        end = prev[end]
    return path[::-1], round(best[path[0]], 2)


class Progress:
    """The ``[quickstart] progress`` line: stages done, elapsed wall time and an ETA from the stage cost
    estimates, scaled by how fast this machine ran the stages finished so far."""

    def __init__(self, specs: list[StageSpec], done: set[str], workers: int):
        self.specs, self.workers = specs, max(1, workers)
        self.done = set(done)
        self.t0 = time.perf_counter()
        self.actual = 0.0
        self.estimated = 0.0

    MIN_COST = 20.0
    """Only stages estimated at this many seconds or more set the speed scale (the short ones are mostly
    imports and start-up, which would make the first ETAs wild)."""

    def finished(self, name: str, seconds: float) -> None:
        self.done.add(name)
        cost = next(s.cost for s in self.specs if s.name == name)
        if cost >= self.MIN_COST:
            self.actual += seconds
            self.estimated += cost

    def line(self, running: dict[str, float] | None = None) -> str:
        running = running or {}
        scale = self.actual / self.estimated if self.estimated > 0 else None
        elapsed = time.perf_counter() - self.t0
        text = f"[quickstart] progress: {len(self.done)}/{len(self.specs)} stages done, {elapsed:.0f} s elapsed"
        if scale is None:
            return text
        cost = {n: 0.0 for n in self.done}
        now = time.perf_counter()
        for n, t in running.items():  # a running stage has (estimated cost - what it has run) left
            est = next(s.cost for s in self.specs if s.name == n)
            cost[n] = max(0.0, est - (now - t) / scale)
        left = {s.name: cost.get(s.name, s.cost) for s in self.specs}
        path = max(remaining_path(self.specs, left).values(), default=0.0)
        eta = scale * max(path, sum(left.values()) / self.workers)
        return f"{text}, ETA ~{eta:.0f} s"


class _Worker:
    def __init__(self, index: int, proc: subprocess.Popen, log: Path):
        self.index, self.proc, self.log = index, proc, log
        self.buffer = b""
        self.stage: str | None = None
        self.started = 0.0


def lease_plan(running: dict[int, StageSpec | None], threads: int) -> dict[int, int]:
    """Threads per worker index: ``threads`` each, and ``2 * threads`` for running ``lendable`` stages
    while idle workers' threads are left (the lower worker index first). A lease only ever doubles a
    stage's count: the quickstart teacher trains bit-identically at 1, 2 and 4 threads but not at 3."""
    plan = {i: threads for i in running}
    spare = threads * sum(1 for s in running.values() if s is None)
    for i in sorted(i for i, s in running.items() if s is not None and s.lendable):
        if spare < threads:
            break
        plan[i] = 2 * threads
        spare -= threads
    return plan


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a worker's process group (the worker and anything it started), then reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _worker_preexec(parent: int) -> Callable[[], None]:
    def preexec() -> None:  # in the forked child, before exec: die with the parent (survives exec)
        set_parent_death_signal(signal.SIGKILL, parent=parent)

    return preexec


def run_parallel(specs: list[StageSpec], done: set[str], workers: int, worker_args: list[str], logs: Path,
                 log: Callable[[str], None] = print, env: dict[str, str] | None = None,
                 module: str = "megatron_kd.quickstart.worker", threads: int = 1) -> dict[str, dict]:
    """Run every stage of ``specs`` not in ``done`` on ``workers`` worker processes
    (``python -m <module> <worker_args> --index i``), critical path first.

    ``threads``: each worker's torch threads; worker i reads its lease ``logs/threads-w<i>`` (written
    here from :func:`lease_plan` whenever a stage starts or ends).

    Returns per stage run here: ``{"worker", "start", "end", "seconds"}`` (start/end: seconds since
    this call began). Raises :class:`StageFailed` on the first failing stage, after killing every worker.
    """
    specs = topological(specs)
    rank = remaining_path(specs)
    pending = [s for s in specs if s.name not in done]
    done = set(done)
    progress = Progress(specs, done, workers)
    timeline: dict[str, dict] = {}
    if not pending:
        return timeline
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pool: list[_Worker] = []
    parent = os.getpid()
    try:
        for i in range(min(workers, len(pending))):
            path = logs / f"worker{i}.log"
            with open(path, "ab") as fh:
                fh.write(f"=== worker {i} started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            lease = logs / f"threads-w{i}"
            write_lease(lease, threads)
            proc = subprocess.Popen([sys.executable, "-m", module, *worker_args,
                                     "--index", str(i)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, env={**(env or os.environ), LEASE_ENV: str(lease)},
                                    start_new_session=True, preexec_fn=_worker_preexec(parent))
            pool.append(_Worker(i, proc, path))
        write_pids = logs / "workers.json"
        write_pids.write_text(json.dumps({"parent": parent, "workers": [w.proc.pid for w in pool]}))
        by_name = {s.name: s for s in specs}
        leased = {w.index: threads for w in pool}
        while pending or any(w.stage for w in pool):
            idle = [w for w in pool if w.stage is None]
            ready = sorted((s for s in pending if all(d in done for d in s.deps)), key=lambda s: -rank[s.name])
            starting = list(zip(idle, ready))
            for w, s in starting:
                w.stage, w.started = s.name, time.perf_counter()
                pending.remove(s)
            # leases before the new stages start, so a lent core is taken back first
            for i, n in lease_plan({w.index: by_name[w.stage] if w.stage else None for w in pool}, threads).items():
                if n != leased[i]:
                    write_lease(logs / f"threads-w{i}", n)
                    if n > threads:
                        log(f"[quickstart] {pool[i].stage}: lent an idle worker's core ({n} threads)")
                    else:
                        log(f"[quickstart] worker {i}: back to {n} thread(s)")
                    leased[i] = n
            for w, s in starting:
                log(f"[quickstart] {s.name}: started on worker {w.index}")
                w.proc.stdin.write(f"{s.name}\n".encode())
                w.proc.stdin.flush()
            busy = {w.proc.stdout.fileno(): w for w in pool if w.stage}
            if not busy:
                raise RuntimeError(f"quickstart scheduler stalled with stages {[s.name for s in pending]} pending")
            readable, _, _ = select.select(list(busy), [], [])
            for fd in readable:
                w = busy[fd]
                chunk = os.read(fd, 65536)
                if not chunk:
                    rc = w.proc.wait()
                    raise StageFailed(w.stage, f"worker {w.index} exited (code {rc}) without finishing the stage",
                                      str(w.log))
                w.buffer += chunk
                while b"\n" in w.buffer:
                    line, w.buffer = w.buffer.split(b"\n", 1)
                    msg = json.loads(line)
                    if msg.get("event") == "failed":
                        raise StageFailed(msg["stage"], msg["error"], str(w.log))
                    if msg.get("event") != "done" or msg.get("stage") != w.stage:
                        raise RuntimeError(f"quickstart worker {w.index}: unexpected message {msg}")
                    end = time.perf_counter()
                    name = w.stage
                    seconds = float(msg["seconds"])
                    timeline[name] = {"worker": w.index, "start": round(w.started - t0, 2),
                                      "end": round(end - t0, 2), "seconds": seconds}
                    done.add(name)
                    progress.finished(name, seconds)
                    w.stage = None
                    log(f"[quickstart] {name}: finished in {seconds:.1f} s on worker {w.index}")
                    log(progress.line({x.stage: x.started for x in pool if x.stage}))
        for w in pool:  # clean shutdown: an empty line ends the worker
            w.proc.stdin.write(b"\n")
            w.proc.stdin.flush()
            w.proc.stdin.close()
        for w in pool:
            try:
                w.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
    finally:
        for w in pool:
            _kill_group(w.proc)
            for stream in (w.proc.stdin, w.proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
    return timeline
