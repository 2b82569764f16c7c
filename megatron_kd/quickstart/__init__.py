"""The CPU quickstart: the whole megatron-kd pipeline on the embedded demo corpus, with a report."""
from megatron_kd.quickstart.pipeline import run_quickstart
from megatron_kd.quickstart.sizes import SIZES, QuickstartSize

__all__ = ["SIZES", "QuickstartSize", "run_quickstart"]
