"""Megatron-style entry point: tokenize JSONL/text into indexed datasets (= ``megatron-kd preprocess``).

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \
        --tokenizer tok.model --output-prefix data/corpus --append-eod --workers 2
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_kd.commands.preprocess import add_preprocess_args, run_preprocess, tool_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(tool_main(add_preprocess_args, run_preprocess, __doc__.splitlines()[0]))
