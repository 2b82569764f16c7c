"""A small ordered process pool: results come back in submission order, at most ``max_inflight``
jobs are in flight (bounded memory), a dead worker is an error instead of a hang, and shutdown is
immediate.

``multiprocessing.Pool.imap`` gives the ordering too, but reads its whole input ahead, hangs
forever if a worker is killed (e.g. out of memory), and spends a noticeable part of a short job
in its handler threads' polling when shutting down.
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import queue
import traceback
from typing import Any, Callable, Iterable, Iterator

_STOP = None


def _worker_loop(initializer, initargs, fn, tasks, results) -> None:
    from megatron_kd.utils.processes import set_parent_death_signal

    set_parent_death_signal()  # a SIGKILLed parent must not leave its workers waiting on the queue
    try:
        if initializer is not None:
            initializer(*initargs)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put((-1, False, _portable(exc)))
        return
    while True:
        item = tasks.get()
        if item is _STOP:
            break
        seq, job = item
        try:
            results.put((seq, True, fn(job)))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, in order
            results.put((seq, False, _portable(exc)))


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it pickles, else a RuntimeError carrying its traceback."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError("".join(traceback.format_exception(exc)).strip())


class OrderedPool:
    """``workers`` processes running ``fn(job)`` after ``initializer(*initargs)``; use as a context
    manager and call :meth:`imap`."""

    def __init__(self, workers: int, fn: Callable[[Any], Any], initializer: Callable | None = None,
                 initargs: tuple = (), start_method: str | None = None, max_inflight: int | None = None):
        method = start_method or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        ctx = mp.get_context(method)
        self.max_inflight = max_inflight or 2 * workers + 2
        self._tasks = ctx.Queue()
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_worker_loop, daemon=True,
                                   args=(initializer, initargs, fn, self._tasks, self._results))
                       for _ in range(workers)]
        # Forked children share the parent's heap copy-on-write; a garbage collection in a child
        # would walk (and so copy) every object the parent ever imported. Freezing them first
        # keeps the children's collections small.
        gc.freeze()
        try:
            for p in self._procs:
                p.start()
        finally:
            gc.unfreeze()

    def _get(self) -> tuple[int, bool, Any]:
        while True:
            try:
                return self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in self._procs if p.exitcode is not None]
                if dead:
                    raise RuntimeError(f"a preprocessing worker died (exit code {dead[0].exitcode}), "
                                       "e.g. out of memory: retry with fewer --workers") from None

    def imap(self, jobs: Iterable[Any]) -> Iterator[Any]:
        """``fn(job)`` for each job, in order; a worker's exception is re-raised here."""
        jobs = iter(jobs)
        pending: dict[int, tuple[bool, Any]] = {}
        submitted = next_out = 0
        exhausted = False
        while True:
            while not exhausted and submitted - next_out < self.max_inflight:
                try:
                    job = next(jobs)
                except StopIteration:
                    exhausted = True
                    break
                self._tasks.put((submitted, job))
                submitted += 1
            if next_out == submitted and exhausted:
                return
            while next_out not in pending:
                seq, ok, value = self._get()
                if seq < 0 and not ok:
                    raise value
                pending[seq] = (ok, value)
            ok, value = pending.pop(next_out)
            next_out += 1
            if not ok:
                raise value
            yield value

    def close(self, graceful: bool = True) -> None:
        """Stop the workers: let them finish (``graceful``) or kill them."""
        if graceful:
            for _ in self._procs:
                self._tasks.put(_STOP)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join()
        for q in (self._tasks, self._results):
            q.cancel_join_thread()
            q.close()

    def __enter__(self) -> "OrderedPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(graceful=exc_type is None)
