"""Run a test function in N spawned processes that form a gloo process group (CPU).

Usage in a test module (the worker must be a module-level function)::

    def _worker(rank, world_size, x):
        init_distributed(ParallelConfig(tensor_parallel=2))
        return some_number

    def test_tp2():
        results = run_workers(_worker, 2, 3.0)   # list, one entry per rank
"""
from __future__ import annotations

import io
import os
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, args, queue):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
        result = fn(rank, world_size, *args)
        # Serialise to bytes: tensors sent through the queue as shared memory vanish when the
        # worker exits before the parent has read them.
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron_kd.runtime import destroy_distributed

            destroy_distributed()
        except Exception:  # noqa: BLE001
            pass


def run_workers(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return per-rank results."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    try:
        for _ in range(world_size):
            while True:
                try:
                    rank, status, payload = queue.get(timeout=2.0)
                    break
                except queue_mod.Empty:
                    dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                    if dead:
                        raise AssertionError(f"worker(s) died without a result (rank, exit code): {dead}") from None
                    if time.monotonic() > deadline:
                        raise AssertionError(f"workers gave no result within {timeout:.0f} s") from None
            if status == "ok":
                import torch

                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
