"""One evaluation run of a checkpoint (what ``megatron-kd eval`` does), as a library call.

    from megatron_kd.evaluation.runner import EvalConfig, run_evaluation
    results = run_evaluation(EvalConfig(ckpt="runs/student", data=["data/held_text_document"],
                                        tasks=["tasks/piqa.jsonl"], out="runs/student/eval.json"))

Inputs are validated (files exist, task files parse, lm_eval importable) before the model loads.
Results are written atomically by rank 0 as JSON with the checkpoint identity; each finished
section is also appended to ``<out>.jsonl`` as it completes.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS_FORMAT = "megatron-kd-eval-v1"


@dataclass
class EvalConfig:
    """What to evaluate and how. Empty lists skip a section; at least one section is needed."""

    ckpt: str = ""
    """Checkpoint directory (``CKPT/latest`` names the iteration)."""
    iteration: int | None = None
    """Evaluate this iteration instead of the latest."""
    tokenizer: str | None = None
    """Tokenizer path; default: the one recorded in the checkpoint (needed for tasks/rouge/harness)."""
    data: list[str] = field(default_factory=list)
    """Indexed-dataset prefixes for held-out LM loss / perplexity."""
    seq_length: int | None = None
    """Tokens of context per LM-loss window; default the checkpoint's training sequence length
    (else min(1024, max_position_embeddings)). The value used is stored as ``context_length``."""
    micro_batch_size: int = 4
    """Windows per forward pass (LM loss)."""
    max_documents: int | None = None
    """Score only the first N documents of each dataset (LM loss)."""
    tasks: list[str] = field(default_factory=list)
    """JSONL multiple-choice tasks (``{"context", "choices", "label"}`` lines)."""
    rouge: list[str] = field(default_factory=list)
    """JSONL generation tasks (``{"prompt", "output"}`` lines) scored with ROUGE-L."""
    limit: int | None = None
    """Use only the first N examples of each task / generation file."""
    batch_size: int = 16
    """Sequences per forward pass for multiple choice and generation."""
    prefix_eod: bool = True
    """Precede every context/prompt with the end-of-document id (as documents start in pre-training)."""
    max_new_tokens: int = 256
    """Generation length limit (ROUGE-L)."""
    temperature: float = 0.0
    """0 = greedy; > 0 samples (MiniLLM reports temperature 1 over 5 seeds)."""
    top_p: float = 1.0
    """Nucleus sampling mass (with temperature > 0)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    seed: int = 0
    """Sampling seed (per prompt: seed and prompt index)."""
    rouge_stemmer: bool = True
    """Porter-stem tokens before ROUGE-L (MiniLLM's setting)."""
    save_predictions: bool = False
    """Store generated texts in the results."""
    harness_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness task names ("miniplm" = the nine MiniPLM tasks); needs lm_eval."""
    harness_include_path: str | None = None
    """Directory of extra lm_eval task YAMLs (e.g. tasks reading local dataset copies)."""
    harness_limit: float | None = None
    """lm_eval ``limit``: examples per task (int) or fraction (< 1)."""
    harness_num_fewshot: int | None = None
    """lm_eval few-shot examples (None = each task's default, zero for the MiniPLM tasks)."""
    tensor_parallel: int = 1
    """TP size when this call initialises distributed (under torchrun: world = TP*PP*DP)."""
    pipeline_parallel: int = 1
    """PP size when this call initialises distributed."""
    params_dtype: str = "fp32"
    """Weights dtype for evaluation: fp32 | bf16 | fp16 (log-probs are computed in fp32)."""
    out: str | None = None
    """Results JSON path (rank 0 writes it atomically); None = return only."""


def _check_file(path: str, what: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")


def validate(cfg: EvalConfig) -> None:
    """One-line errors for bad inputs, before any model is loaded."""
    from megatron_kd.evaluation.lm_loss import strip_dataset_ext
    from megatron_kd.evaluation.multiple_choice import load_mc_task
    from megatron_kd.evaluation.rouge import load_generation_task
    from megatron_kd.training.checkpoint import read_checkpoint_meta
    import megatron_kd.interop.source  # noqa: F401 - a Hugging Face model directory serves as a checkpoint

    if not cfg.ckpt:
        raise ValueError("no checkpoint given: pass --ckpt CKPT_DIR")
    meta = read_checkpoint_meta(cfg.ckpt, cfg.iteration)
    max_len = int(meta["model_config"].get("max_position_embeddings", 2048))
    if cfg.seq_length is not None and not 1 <= cfg.seq_length <= max_len:
        raise ValueError(f"--seq-length {cfg.seq_length} must be in [1, {max_len}] "
                         "(the checkpoint's max_position_embeddings)")
    if not (cfg.data or cfg.tasks or cfg.rouge or cfg.harness_tasks):
        raise ValueError("nothing to evaluate: pass --data, --tasks, --rouge and/or --harness-tasks")
    for prefix in cfg.data:
        for ext in (".bin", ".idx"):
            _check_file(strip_dataset_ext(prefix) + ext, "indexed dataset file")
    for task in cfg.tasks:
        load_mc_task(task, cfg.limit)
    for task in cfg.rouge:
        load_generation_task(task, cfg.limit)
    if cfg.tokenizer is not None and not Path(cfg.tokenizer).exists():
        raise FileNotFoundError(f"tokenizer {cfg.tokenizer} does not exist")
    if cfg.harness_tasks:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise ValueError("--harness-tasks needs lm-evaluation-harness: pip install 'megatron-kd[eval]' "
                             "(or pip install lm_eval)") from None
        if cfg.harness_include_path and not Path(cfg.harness_include_path).is_dir():
            raise FileNotFoundError(f"--harness-include-path {cfg.harness_include_path} is not a directory")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        raise ValueError(f"--temperature {cfg.temperature} must be >= 0 and --top-p {cfg.top_p} in (0, 1]")
    if cfg.out and Path(cfg.out).is_dir():
        raise ValueError(f"--out {cfg.out} is a directory: pass a file path such as {cfg.out}/eval.json")


def run_evaluation(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt`` on every requested section; collective (call on every rank).

    Returns (on every rank) ``{"format", "checkpoint", "parallel", "config", "lm_loss",
    "multiple_choice", "rouge", "harness", "elapsed_s"}``; rank 0 writes it to ``cfg.out``.
    """
    from megatron.core import parallel_state

    from megatron_kd.evaluation.lm_loss import evaluate_lm_loss, open_eval_dataset, strip_dataset_ext
    from megatron_kd.evaluation.loading import load_eval_target
    from megatron_kd.evaluation.multiple_choice import evaluate_multiple_choice
    from megatron_kd.evaluation.rouge import evaluate_rouge
    from megatron_kd.runtime.distributed import is_main_process
    from megatron_kd.utils.io import write_json_atomic
    from megatron_kd.utils.progress import JsonlWriter

    validate(cfg)
    start = time.time()
    needs_tok = bool(cfg.tasks or cfg.rouge or cfg.harness_tasks)
    target = load_eval_target(cfg.ckpt, tokenizer=cfg.tokenizer, tokenizer_required=needs_tok,
                              tensor_parallel=cfg.tensor_parallel, pipeline_parallel=cfg.pipeline_parallel,
                              params_dtype=cfg.params_dtype, iteration=cfg.iteration)
    seq_length = target.resolve_seq_length(cfg.seq_length) if cfg.data else cfg.seq_length
    context_source = ("--seq-length" if cfg.seq_length is not None else
                      "the checkpoint's training seq_length" if target.training_seq_length else
                      "min(1024, max_position_embeddings)")
    if cfg.data and is_main_process():
        import sys

        print(f"megatron-kd eval: LM-loss context {seq_length} tokens ({context_source})", file=sys.stderr,
              flush=True)
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT, "checkpoint": target.identity,
        "context_length": seq_length, "context_source": context_source if cfg.data else None,
        "parallel": {"tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
                     "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
                     "data_parallel": parallel_state.get_data_parallel_world_size()},
        "config": asdict(cfg), "lm_loss": {}, "multiple_choice": {}, "rouge": {}, "harness": None,
    }
    log = JsonlWriter(Path(cfg.out).with_suffix(".jsonl") if cfg.out else None)

    def record(section: str, name: str, value: dict[str, Any]) -> None:
        log.write({"section": section, "name": name, "checkpoint": target.identity["checkpoint"],
                   "iteration": target.identity["iteration"],
                   **{k: v for k, v in value.items() if k != "predictions"}})

    for prefix in map(strip_dataset_ext, cfg.data):
        target.check_dataset_tokenizer(prefix)
        res = evaluate_lm_loss(target.model, open_eval_dataset(prefix), target.vocab_size, seq_length,
                               cfg.micro_batch_size, max_documents=cfg.max_documents, tokenizer=target.tokenizer)
        results["lm_loss"][Path(prefix).name] = {"dataset": prefix, **res}
        record("lm_loss", Path(prefix).name, res)
    for task in cfg.tasks:
        res = evaluate_multiple_choice(target.model, target.tokenizer, task, target.vocab_size, cfg.batch_size,
                                       target.max_length, cfg.limit, prefix_eod=cfg.prefix_eod)
        results["multiple_choice"][res["task"]] = {"path": str(task), **res}
        record("multiple_choice", res["task"], res)
    for task in cfg.rouge:
        res = evaluate_rouge(target.model, target.tokenizer, task, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed,
                             batch_size=cfg.batch_size, limit=cfg.limit, use_stemmer=cfg.rouge_stemmer,
                             vocab_size=target.vocab_size, max_length=target.max_length,
                             return_predictions=cfg.save_predictions)
        results["rouge"][res["task"]] = {"path": str(task), **res}
        record("rouge", res["task"], res)
    if cfg.harness_tasks:
        from megatron_kd.evaluation.lm_eval_adapter import MegatronKDLM, run_harness

        lm = MegatronKDLM(model=target.model, tokenizer=target.tokenizer, vocab_size=target.vocab_size,
                          max_length=target.max_length, batch_size=cfg.batch_size,
                          max_gen_toks=cfg.max_new_tokens, prefix_eod=cfg.prefix_eod, seed=cfg.seed)
        results["harness"] = run_harness(lm, cfg.harness_tasks, cfg.harness_include_path, cfg.harness_limit,
                                         cfg.harness_num_fewshot)
        record("harness", ",".join(cfg.harness_tasks), results["harness"]["headline"])
    log.close()
    results["elapsed_s"] = round(time.time() - start, 3)
    if cfg.out and is_main_process():
        write_json_atomic(cfg.out, results)
    return results
