"""Evaluation: held-out LM loss / perplexity, zero-shot multiple choice, ROUGE-L on generations.

All evaluators take this rank's model stage and work for any TP/PP/DP layout (collective: call
them on every rank; every rank gets the result). The lm-evaluation-harness adapter lives in
:mod:`megatron_kd.evaluation.lm_eval_adapter` (imported on demand: ``lm_eval`` is optional).
"""
from megatron_kd.evaluation.generate import generate, sample_next
from megatron_kd.evaluation.lm_loss import (
    document_windows,
    evaluate_checkpoint_lm_loss,
    evaluate_lm_loss,
    open_eval_dataset,
)
from megatron_kd.evaluation.loading import EvalTarget, load_eval_target
from megatron_kd.evaluation.multiple_choice import evaluate_multiple_choice, load_mc_task
from megatron_kd.evaluation.rouge import evaluate_rouge, load_generation_task, rouge_l, rouge_tokenize
from megatron_kd.evaluation.scoring import encode_pair, score_continuations
from megatron_kd.evaluation.vocab import token_logprobs

__all__ = [
    "EvalTarget",
    "document_windows",
    "encode_pair",
    "evaluate_checkpoint_lm_loss",
    "evaluate_lm_loss",
    "evaluate_multiple_choice",
    "evaluate_rouge",
    "generate",
    "load_eval_target",
    "load_generation_task",
    "load_mc_task",
    "open_eval_dataset",
    "rouge_l",
    "rouge_tokenize",
    "sample_next",
    "score_continuations",
    "token_logprobs",
]
