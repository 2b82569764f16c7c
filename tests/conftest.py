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
