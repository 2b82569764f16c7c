"""Shared pytest setup: GPU tests skip cleanly without CUDA; tests run single-threaded-ish."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # dist_helpers, importable from spawned workers too


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# Helpers of the multiprocessing machinery itself, which live as long as the test process.
_EXPECTED_CHILDREN = ("resource_tracker", "forkserver", "semaphore_tracker")


def _leftover_children(grace_s: float):
    import time

    import psutil

    deadline = time.time() + grace_s
    while True:
        alive = []
        for child in psutil.Process().children(recursive=True):
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
                if any(name in " ".join(child.cmdline()) for name in _EXPECTED_CHILDREN):
                    continue
                alive.append(child)
            except psutil.Error:
                continue
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.5)


def pytest_sessionfinish(session, exitstatus):
    """The suite must leave no process behind (orphaned checkpoint writers, workers): any child
    still alive after a grace period is reported, killed, and fails the session."""
    import psutil

    left = _leftover_children(grace_s=15.0)
    if not left:
        return
    lines = []
    for child in left:
        try:
            lines.append(f"  pid {child.pid}: {' '.join(child.cmdline())[:160]}")
            child.kill()
        except psutil.Error:
            continue
    print("\nERROR: the test session left child processes behind (killed now):\n" + "\n".join(lines))
    session.exitstatus = 1


DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def dist1():
    """A world-size-1 process group in the pytest process, torn down (and the torchrun-style
    variables restored) after the module so other modules start clean."""
    from megatron_kd.runtime import ParallelConfig, destroy_distributed, init_distributed

    saved = {k: os.environ.get(k) for k in DIST_ENV}
    init_distributed(ParallelConfig())
    yield
    destroy_distributed()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
