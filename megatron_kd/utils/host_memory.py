"""The host (CPU) allocator of a training process: keep freed memory instead of returning it.

glibc's ``malloc`` serves a large allocation with a fresh ``mmap`` (above a threshold that starts at
128 KiB and only adapts up to 32 MiB) and gives memory freed at the top of its heap back to the kernel
(above a trim threshold of twice that). A CPU training step allocates and frees tensors of many MiB
(activations, logits chunks, gradients) every step, so it page-faults them in again each time, and
the kernel zeroes every 4 KiB page on the way. Fixed thresholds -- blocks up to 32 MiB from the heap,
up to 1 GiB of freed heap kept mapped -- remove most of that: the quickstart's teacher (4 x 256,
2,048 tokens per step, one thread) spent 5.1-6.1 s of system time in 30 steps with glibc's defaults
and 2.0 s with these, and its wall time was 4-8 s lower in each of 7 paired runs (37-40 s vs 41-46 s;
2026-12-07, 2-vCPU VM). The arithmetic is the same on the same values (results are bit-identical);
the cost is resident memory that is not given back while the process runs.

glibc reads these settings when a process starts (``MALLOC_*_`` environment variables), so they are
given to the processes a run starts (:func:`host_malloc_env`), e.g. the quickstart's stage workers.
"""
from __future__ import annotations

import os
import sys

MIB = 1 << 20

HOST_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * MIB),  # glibc's largest: smaller blocks come from the heap
    "MALLOC_TRIM_THRESHOLD_": str(1024 * MIB),  # freed heap kept mapped up to this much
    "MALLOC_TOP_PAD_": str(256 * MIB),  # each heap extension grows by this much more
}
"""glibc malloc settings for CPU training processes (see the module docstring)."""


def host_malloc_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The ``MALLOC_*_`` variables to add to a training process's environment: :data:`HOST_MALLOC_ENV`
    on Linux, none when ``environ`` (default: this process's) already sets any ``MALLOC_*_`` variable
    (the user's own tuning wins) or ``MEGATRON_KD_HOST_MALLOC=default``."""
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or env.get("MEGATRON_KD_HOST_MALLOC", "").lower() == "default":
        return {}
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in env):
        return {}
    return dict(HOST_MALLOC_ENV)
