"""``python -m megatron_kd.utils.launch``: ``torchrun`` that passes the workers' exit code through.

Plain ``torchrun`` turns any failed worker into its own exit code 1, and a SIGTERM to ``torchrun``
itself (Slurm ``scancel``, preemption) into an exception, so a scheduler cannot tell "checkpoint
saved, requeue me" (75) from "bad input" (2) or a crash. This wrapper takes exactly ``torchrun``'s
arguments and exits with:

* 0 when every worker finished;
* the exit code of the **first** worker that failed, when it is one of megatron-kd's documented
  codes (2 bad input, 3 non-finite, 74 filesystem, 75 interrupted-and-saved; see
  :mod:`megatron_kd.utils.exits`), otherwise 1;
* 75 when ``torchrun`` itself was sent SIGTERM/SIGINT/SIGHUP: it forwards the signal to the
  workers, which finish their step, save, and stop (a rerun resumes; a finished run's rerun does
  nothing and exits 0).

Example::

    python -m megatron_kd.utils.launch --nproc-per-node 2 -m megatron_kd pretrain --config cfg.yaml
"""
from __future__ import annotations

import sys

from megatron_kd.utils.exits import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_IO_ERROR, EXIT_NONFINITE, EXIT_REQUEUE

PASSED_THROUGH = (EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_IO_ERROR, EXIT_REQUEUE)


def worker_exit_code(failures: dict) -> int:
    """The launcher's exit code for torch's ``ChildFailedError.failures`` (rank -> ProcessFailure):
    the first failure's code when it is a documented megatron-kd code, else 1."""
    if not failures:
        return EXIT_ERROR
    first = min(failures.values(), key=lambda f: f.timestamp)
    if first.exitcode in PASSED_THROUGH:
        return first.exitcode
    # A worker killed by the launcher after another one stopped with a documented code.
    codes = {f.exitcode for f in failures.values()}
    for code in PASSED_THROUGH:
        if code in codes:
            return code
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    """Run ``torchrun`` with ``argv``; return the exit code described in the module docstring."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as exc:
        code = worker_exit_code(exc.failures)
        print(f"megatron-kd launch: worker failed, exit code {code}", file=sys.stderr)
        return code
    except SignalException as exc:
        print(f"megatron-kd launch: {exc.sigval.name} forwarded to the workers (they save and stop): "
              f"exit code {EXIT_REQUEUE} = requeue", file=sys.stderr)
        return EXIT_REQUEUE
    return 0


if __name__ == "__main__":
    sys.exit(main())
