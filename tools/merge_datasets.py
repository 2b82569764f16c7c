"""Megatron-style entry point: merge indexed datasets into one (= ``megatron-kd merge-datasets``).

    python tools/merge_datasets.py --input data/part0_text_document data/part1_text_document \
        --output-prefix data/all_text_document
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_kd.commands.preprocess import add_merge_args, run_merge, tool_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(tool_main(add_merge_args, run_merge, __doc__.splitlines()[0]))
