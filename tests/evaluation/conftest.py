"""Evaluation tests: a world-size-1 process group in the pytest process (multi-rank layouts use
run_workers), torn down after each module so other test modules start clean."""
import os
import sys


sys.path.insert(0, os.path.dirname(__file__))  # evalkit, importable from spawned workers too


