"""Distillation tests: helpers importable from spawned workers; a world-size-1 process group in the
pytest process for in-process tests (torn down after each module so other modules start clean)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # distkit, importable from spawned workers too

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def dist1():
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
