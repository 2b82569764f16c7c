"""``megatron-kd eval``: held-out LM loss, zero-shot multiple choice, ROUGE-L, lm-eval tasks.

Thin argument parsing over :func:`megatron_kd.evaluation.runner.run_evaluation`. Runs as one
process, or under ``torchrun --nproc-per-node N`` with ``--tensor-parallel``/``--pipeline-parallel``.
"""
from __future__ import annotations

import argparse
import json
import sys

from megatron_kd.commands._flags import flag


def _csv(value: str) -> list[str]:
    return [v for v in (s.strip() for s in value.split(",")) if v]


def register(subparsers) -> None:
    """Add the ``eval`` sub-command."""
    from types import SimpleNamespace

    from megatron_kd.config import source_defaults

    # EvalConfig's defaults, read from its source: importing the evaluation package would import torch.
    d = SimpleNamespace(**source_defaults("megatron_kd.evaluation.runner", "EvalConfig"))
    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: LM loss / perplexity, multiple choice, ROUGE-L, lm-eval tasks",
        description="Evaluate a megatron-kd checkpoint. See docs/evaluation.md for formats and conventions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file with EvalConfig keys (see --help-config); flags given "
                   "on the command line win over it and over the overrides")
    p.add_argument("--dry-run", action="store_true",
                   help="check the inputs (checkpoint, data, task files) without loading the model, print the "
                        "resolved config, and exit")
    p.add_argument("overrides", nargs="*", default=[], help="EvalConfig overrides like seq_length=256 limit=10")
    flag(p, "--checkpoint", dest="ckpt", help="checkpoint directory (its 'latest' iteration is used)")
    p.add_argument("--iteration", type=int, default=d.iteration, help="evaluate this iteration instead")
    p.add_argument("--tokenizer", default=d.tokenizer,
                   help="tokenizer path; None = the one recorded in the checkpoint")
    p.add_argument("--data", type=_csv, default=[], help="comma-separated indexed-dataset prefixes for LM loss")
    p.add_argument("--seq-length", type=int, default=d.seq_length,
                   help="context tokens per LM-loss window; default: the checkpoint's training seq length "
                        "(else min(1024, max_position_embeddings)); stored as context_length")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size, help="LM-loss windows per forward")
    p.add_argument("--max-documents", type=int, default=d.max_documents, help="LM loss on the first N documents only")
    p.add_argument("--tasks", type=_csv, default=[], help="comma-separated JSONL multiple-choice task files")
    p.add_argument("--rouge", type=_csv, default=[], help="comma-separated JSONL generation tasks for ROUGE-L")
    p.add_argument("--limit", type=int, default=d.limit, help="first N examples of each task/generation file")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per forward (tasks, generation)")
    p.add_argument("--no-eod-prefix", dest="prefix_eod", action="store_false",
                   help="do not precede contexts/prompts with the end-of-document id")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="generation length limit")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy, > 0 = sampling")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=d.top_k, help="top-k sampling (0 = off)")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed")
    p.add_argument("--rouge-no-stem", dest="rouge_stemmer", action="store_false",
                   help="ROUGE-L without Porter stemming (MiniLLM stems)")
    p.add_argument("--save-predictions", action="store_true", help="store generated texts in the results")
    p.add_argument("--harness-tasks", type=_csv, default=[],
                   help="lm-evaluation-harness tasks, comma-separated; 'miniplm' = the nine MiniPLM tasks")
    p.add_argument("--harness-include-path", default=d.harness_include_path,
                   help="directory of extra lm_eval task YAMLs (e.g. reading local dataset copies)")
    p.add_argument("--harness-limit", type=float, default=d.harness_limit,
                   help="lm_eval limit: examples per task (or a fraction < 1)")
    p.add_argument("--harness-num-fewshot", type=int, default=d.harness_num_fewshot,
                   help="lm_eval few-shot examples; None = the task's own (0 for MiniPLM's)")
    flag(p, "--tensor-parallel", type=int, default=d.tensor_parallel, help="tensor-parallel size")
    flag(p, "--pipeline-parallel", type=int, default=d.pipeline_parallel, help="pipeline-parallel size")
    p.add_argument("--params-dtype", default=d.params_dtype, choices=["fp32", "bf16", "fp16"],
                   help="weights dtype (log-probs are computed in fp32)")
    flag(p, "--output", dest="out", default=d.out, help="results JSON path (written atomically by rank 0)")
    p.set_defaults(func=run, config_class="megatron_kd.evaluation.runner:EvalConfig", wants_explicit=True)


def run(args: argparse.Namespace) -> int:
    """Build the config from ``args``, evaluate, print a summary on rank 0."""
    from dataclasses import fields

    from megatron_kd.config import load_config
    from megatron_kd.evaluation.runner import EvalConfig, run_evaluation, validate

    # EvalConfig defaults < --config YAML < key=value overrides < flags given on the command line.
    cfg = load_config(EvalConfig, args.config, args.overrides)
    explicit = getattr(args, "explicit", None)
    for f in fields(EvalConfig):
        given = f.name in explicit if explicit is not None else getattr(args, f.name) != f.default
        if given or (not args.config and not args.overrides):
            setattr(cfg, f.name, getattr(args, f.name))
    if cfg.harness_limit is not None and cfg.harness_limit >= 1:
        cfg.harness_limit = int(cfg.harness_limit)
    if not cfg.ckpt:
        raise ValueError("no checkpoint given: pass --checkpoint CKPT_DIR (or ckpt: in --config)")
    if args.dry_run:
        import yaml

        from megatron_kd.config import to_dict

        validate(cfg)
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from megatron_kd.runtime.distributed import is_main_process

    results = run_evaluation(cfg)
    if is_main_process():
        summary = {"lm_loss": {k: {m: v[m] for m in ("loss", "ppl", "tokens")} for k, v in results["lm_loss"].items()},
                   "multiple_choice": {k: {m: v[m] for m in ("acc", "acc_norm", "n")}
                                       for k, v in results["multiple_choice"].items()},
                   "rouge": {k: {m: v[m] for m in ("rougeL", "n")} for k, v in results["rouge"].items()},
                   "harness": (results["harness"] or {}).get("headline")}
        summary["context_length"] = results.get("context_length")
        print(json.dumps({k: v for k, v in summary.items() if v}, indent=2), file=sys.stdout)
    return 0
