"""MiniPLM difference sampling: scoring and selection (docs/miniplm.md).

Pipeline: :func:`split_dataset` (held-out reference split) -> train the reference with
``megatron-kd pretrain`` -> :func:`score_corpus` (teacher and reference NLL per instance) ->
:func:`select_corpus` (top-alpha by r = nll_ref - nll_teacher, refined dataset + report).
"""
from megatron_kd.miniplm.instances import INSTANCE_DTYPE, split_instances
from megatron_kd.miniplm.score import ScoreConfig, score_corpus
from megatron_kd.miniplm.select import SelectConfig, difference_scores, num_to_keep, select_corpus, top_fraction
from megatron_kd.miniplm.split import SplitConfig, split_dataset
from megatron_kd.miniplm.store import SCORE_DTYPE, ScoreStore

__all__ = [
    "INSTANCE_DTYPE", "SCORE_DTYPE", "ScoreConfig", "ScoreStore", "SelectConfig", "SplitConfig",
    "difference_scores", "num_to_keep", "score_corpus", "select_corpus", "split_dataset",
    "split_instances", "top_fraction",
]
