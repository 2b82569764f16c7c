"""MoE-teacher tests reuse the logits-store and MiniPLM test helpers (importable from spawned workers too)."""
import os
import sys

_HERE = os.path.dirname(__file__)
for sub in ("logits", "miniplm"):
    sys.path.insert(0, os.path.join(_HERE, "..", sub))
