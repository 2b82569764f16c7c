"""The ordered worker pool behind ``preprocess --workers``: order, errors, dead workers.

    PYTHONPATH=$PWD python -m pytest -q tests/data/test_data_workers.py
"""
import os
import signal
import time

import pytest

from megatron_kd.data.workers import OrderedPool

_STATE = {}


def _init(offset):
    _STATE["offset"] = offset


def _slow_square(x):
    time.sleep(0.002 * ((x * 7) % 5))  # finish out of order
    if x == -1:
        raise KeyError("bad job -1")
    if x == -9:
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x + _STATE["offset"]


def test_results_in_submission_order_with_bounded_inflight():
    with OrderedPool(2, _slow_square, _init, (1,), max_inflight=3) as pool:
        assert list(pool.imap(range(40))) == [x * x + 1 for x in range(40)]


def test_worker_exception_is_reraised_in_order():
    with pytest.raises(KeyError, match="bad job -1"):
        with OrderedPool(2, _slow_square, _init, (0,)) as pool:
            out = []
            for y in pool.imap([1, 2, -1, 3]):
                out.append(y)
    assert out == [1, 4]


def test_dead_worker_is_an_error_not_a_hang():
    t0 = time.time()
    with pytest.raises(RuntimeError, match="worker died"):
        with OrderedPool(2, _slow_square, _init, (0,)) as pool:
            list(pool.imap([1, -9, 2, 3]))
    assert time.time() - t0 < 30
