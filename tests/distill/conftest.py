"""Distillation tests: helpers importable from spawned workers; a world-size-1 process group in the
pytest process for in-process tests (torn down after each module so other modules start clean)."""
import os
import sys


sys.path.insert(0, os.path.dirname(__file__))  # distkit, importable from spawned workers too

