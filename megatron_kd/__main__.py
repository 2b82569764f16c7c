"""``python -m megatron_kd`` = ``megatron-kd``."""
import sys

from megatron_kd.cli import main

sys.exit(main())
