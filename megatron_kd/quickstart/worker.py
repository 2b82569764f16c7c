"""A quickstart worker process (``python -m megatron_kd.quickstart.worker``), started by
:func:`megatron_kd.quickstart.schedule.run_parallel`.

Reads stage names, one per line, on stdin; runs each with :meth:`Quickstart.run_stage` (inputs from
the completed stages' markers under ``OUT/stages``); answers one JSON line per stage on its original
stdout (``{"event": "done", "stage", "seconds"}`` or ``{"event": "failed", "stage", "error"}``, then
exits 1). An empty line or end of input ends it. Everything the stages print goes to
``OUT/logs/worker<i>.log``. Torch runs ``--threads`` threads (fixed, so a stage computes the same
numbers on any worker and in a ``--workers 1`` run), except that a training loop follows the
worker's thread lease (``$MEGATRON_KD_THREAD_LEASE``, :mod:`megatron_kd.utils.threads`), which the
scheduler raises only for stages whose numbers do not depend on it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron_kd.quickstart.worker")
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--index", type=int, required=True)
    args = ap.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The protocol keeps the original stdout; fds 1 and 2 (Python and C output) go to the worker log.
    answer = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    log_path = os.path.join(args.out, "logs", f"worker{args.index}.log")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, encoding="utf-8", closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, encoding="utf-8", closefd=False)

    from megatron_kd.utils import quiet
    from megatron_kd.utils.processes import children_die_with_parent

    quiet.install(False)
    children_die_with_parent()
    from megatron_kd.quickstart.pipeline import Quickstart, set_stage_threads
    from megatron_kd.quickstart.sizes import SIZES
    from megatron_kd.utils.exits import one_line

    set_stage_threads(args.threads)
    while True:
        line = sys.stdin.readline()
        name = line.strip()
        if not name:
            return 0
        try:
            qs = Quickstart(args.out, SIZES[args.size], args.seed, log=print)
            result = qs.run_stage(name, worker=args.index)
            answer.write(json.dumps({"event": "done", "stage": name, "seconds": result["seconds"]}) + "\n")
        except BaseException as exc:  # noqa: BLE001 - any failure is reported to the parent in one line
            traceback.print_exc()
            sys.stdout.flush()
            answer.write(json.dumps({"event": "failed", "stage": name, "error": one_line(exc)}) + "\n")
            answer.flush()
            return 1


if __name__ == "__main__":
    sys.exit(main())
