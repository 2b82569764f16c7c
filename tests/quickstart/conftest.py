"""Quickstart test helpers."""
import time

import pytest


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def wait_gone():
    """``wait_gone(pids, timeout)``: the pids still running (not zombies) after up to ``timeout`` s."""
    def wait(pids, timeout: float = 10.0) -> list[int]:
        end = time.time() + timeout
        while True:
            alive = [p for p in pids if not _gone(p)]
            if not alive or time.time() > end:
                return alive
            time.sleep(0.05)

    return wait
