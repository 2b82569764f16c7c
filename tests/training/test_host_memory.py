"""glibc malloc settings for CPU training processes (megatron_kd.utils.host_memory): what they are,
when they are left alone, and that a process started with them stops page-faulting freed blocks back in."""
import os
import subprocess
import sys

import pytest

from megatron_kd.utils.host_memory import HOST_MALLOC_ENV, host_malloc_env

FAULTS = """
import resource
import numpy as np
def cycle():  # what a training step does with its activations: big blocks, freed again
    a, b, c = np.ones(3 << 20), np.ones(3 << 20), np.ones(5 << 20)  # 24, 24 and 40 MiB
    del a, b, c
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_settings_and_when_they_are_left_alone():
    if sys.platform.startswith("linux"):
        assert host_malloc_env({}) == HOST_MALLOC_ENV
        assert int(HOST_MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]) == 32 << 20  # glibc refuses more
    assert host_malloc_env({"MALLOC_ARENA_MAX_": "2"}) == {}  # the user's own malloc tuning wins
    assert host_malloc_env({"MEGATRON_KD_HOST_MALLOC": "default"}) == {}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_a_process_with_them_does_not_fault_freed_blocks_back_in():
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    faults = {}
    for name, extra in (("default", {}), ("tuned", host_malloc_env(base))):
        out = subprocess.run([sys.executable, "-c", FAULTS], env={**base, **extra}, capture_output=True, text=True,
                             check=True)
        faults[name] = int(out.stdout.strip())
    # glibc's defaults give freed blocks back and fault them in again (~1,500 pages per cycle here)
    assert faults["default"] > 20 * 500 and faults["tuned"] < faults["default"] / 20, faults
