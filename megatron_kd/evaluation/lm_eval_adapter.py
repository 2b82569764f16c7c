"""lm-evaluation-harness (``lm_eval``, optional: ``pip install megatron-kd[eval]``) over megatron-kd models.

:class:`MegatronKDLM` implements lm_eval's ``LM`` interface on a megatron-kd checkpoint (or an
already built model stage) and is registered as model ``megatron-kd``::

    import lm_eval
    from megatron_kd.evaluation.lm_eval_adapter import MegatronKDLM
    lm = MegatronKDLM(ckpt="runs/student", tokenizer="runs/tok.model")
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

From the shell (lm_eval's own CLI only knows built-in models, so this module forwards to it after
registering ``megatron-kd``)::

    python -m megatron_kd.evaluation.lm_eval_adapter --model megatron-kd \\
        --model_args ckpt=runs/student,tokenizer=runs/tok.model --batch_size 16 --tasks piqa,arc_easy

All ranks of a TP/PP group must drive the same requests: the adapter reports rank 0 / world size 1
to lm_eval (each model-parallel replica evaluates everything), so launch it with data-parallel
size 1 (``torchrun --nproc-per-node TP*PP``). Scoring is shared with
:mod:`megatron_kd.evaluation.multiple_choice` (same tokenisation and truncation conventions).
"""
from __future__ import annotations

import sys
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from megatron_kd.evaluation.generate import generate
from megatron_kd.evaluation.scoring import encode_pair, score_continuations

MINIPLM_TASKS = ["hellaswag", "lambada_openai", "winogrande", "openbookqa", "arc_easy", "arc_challenge",
                 "piqa", "social_iqa", "storycloze_2018"]
"""The nine zero-shot tasks MiniPLM reports (lm_eval task names); their average is the headline."""


def _as_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default  # e.g. lm_eval's batch_size="auto"


def _as_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("megatron-kd", "megatron_kd")
class MegatronKDLM(LM):
    """lm_eval ``LM`` over a megatron-kd model: ``loglikelihood``, ``loglikelihood_rolling`` and
    ``generate_until`` (greedy, or sampling when ``do_sample``/``temperature`` ask for it)."""

    def __init__(self, ckpt: str | None = None, tokenizer: Any = None, model: Any = None,
                 vocab_size: int | None = None, max_length: int | None = None, batch_size: Any = 16,
                 max_gen_toks: int = 256, prefix_eod: Any = True, tensor_parallel: Any = 1,
                 pipeline_parallel: Any = 1, params_dtype: str = "fp32", iteration: Any = None,
                 seed: Any = 0, **unused: Any) -> None:
        """``ckpt`` (a megatron-kd checkpoint directory; ``tokenizer`` path defaults to the one it
        records), or ``model`` (this rank's built stage) + ``tokenizer`` object + ``vocab_size``.
        ``max_length``: longest scored input in tokens (default: the model's maximum)."""
        super().__init__()
        if ckpt is not None:
            from megatron_kd.evaluation.loading import load_eval_target

            target = load_eval_target(ckpt, tokenizer=tokenizer, tensor_parallel=_as_int(tensor_parallel, 1),
                                      pipeline_parallel=_as_int(pipeline_parallel, 1), params_dtype=params_dtype,
                                      iteration=None if iteration is None else int(iteration))
            model, tokenizer, vocab_size = target.model, target.tokenizer, target.vocab_size
            max_length = max_length or target.max_length
            self.identity = target.identity
        elif model is None or tokenizer is None:
            raise ValueError("MegatronKDLM needs ckpt=CKPT_DIR, or model= and tokenizer= objects")
        else:
            self.identity = {}
        self.model, self.tokenizer = model, tokenizer
        self.vocab_size = _as_int(vocab_size, 0) or tokenizer.vocab_size
        self.max_length = _as_int(max_length, 0) or getattr(model, "max_sequence_length", 2048)
        self.batch_size = _as_int(batch_size, 16)
        self.max_gen_toks = _as_int(max_gen_toks, 256)
        self.prefix_eod = _as_bool(prefix_eod)
        self.seed = _as_int(seed, 0)

    # ---- lm_eval LM interface -------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per request; ``args = (context, continuation)``."""
        pairs = [encode_pair(self.tokenizer, ctx, cont, self.prefix_eod) for ctx, cont in (r.args for r in requests)]
        results = score_continuations(self.model, pairs, self.vocab_size, self.max_length, self.batch_size,
                                      desc="loglikelihood", show_progress=not disable_tqdm)
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log p of each string (``args = (text,)``), in disjoint windows of ``max_length``
        tokens; the first token is predicted from the end-of-document id (lm_eval's prefix)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        eod = int(self.tokenizer.eod)
        pairs, owner = [], []
        for k, req in enumerate(requests):
            ids = list(self.tokenizer.encode(req.args[0]))
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, eod, self.max_length, 1)):
                pairs.append((ctx, cont))
                owner.append(k)
        scored = score_continuations(self.model, pairs, self.vocab_size, self.max_length, self.batch_size,
                                     desc="loglikelihood_rolling", show_progress=not disable_tqdm)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, scored):
            totals[k] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of ``args = (context, gen_kwargs)``; ``gen_kwargs``: ``until`` (stop
        strings), ``max_gen_toks``, ``do_sample``, ``temperature``, ``top_p``, ``top_k``."""
        groups: dict[tuple, list[int]] = {}
        for k, req in enumerate(requests):
            kw = dict(req.args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = _as_bool(kw.get("do_sample", False))
            temperature = float(kw.get("temperature", 1.0 if sample else 0.0)) if sample else 0.0
            key = (tuple(until), _as_int(kw.get("max_gen_toks"), self.max_gen_toks), temperature,
                   float(kw.get("top_p", 1.0)), _as_int(kw.get("top_k"), 0))
            groups.setdefault(key, []).append(k)
        out: list[str] = [""] * len(requests)
        for (until, max_new, temperature, top_p, top_k), idx in groups.items():
            texts = generate(self.model, self.tokenizer, [requests[k].args[0] for k in idx], max_new_tokens=max_new,
                             temperature=temperature, top_p=top_p, top_k=top_k, seed=self.seed, stop=list(until),
                             batch_size=self.batch_size, vocab_size=self.vocab_size, max_length=self.max_length,
                             prefix_eod=self.prefix_eod, show_progress=not disable_tqdm)
            for k, text in zip(idx, texts):
                out[k] = text
                self.cache_hook.add_partial("generate_until", requests[k].args, text)
        return out


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """Per task the MiniPLM headline metric (``acc_norm`` when reported, else ``acc``) and their mean."""
    picked: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for name in ("acc_norm,none", "acc,none"):
            if isinstance(metrics.get(name), (int, float)):
                picked[task] = float(metrics[name])
                break
    return {"per_task": picked, "average": sum(picked.values()) / len(picked) if picked else None}


def run_harness(lm: MegatronKDLM, tasks: list[str], include_path: str | None = None, limit: float | None = None,
                num_fewshot: int | None = None, seed: int = 1234, include_defaults: bool = True) -> dict[str, Any]:
    """Run lm_eval tasks (``"miniplm"`` expands to :data:`MINIPLM_TASKS`) on ``lm``.

    ``include_path``: a directory of extra task YAMLs (e.g. local copies of the datasets);
    ``include_defaults=False`` skips indexing lm_eval's thousands of built-in tasks (faster).
    Returns ``{"results": {task: metrics}, "headline": {...}, "tasks", "limit", "num_fewshot"}``.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = [t for name in tasks for t in (MINIPLM_TASKS if name == "miniplm" else [name])]
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                  log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=1000)
    results = {t: {k: v for k, v in m.items() if isinstance(v, (int, float, str))}
               for t, m in (out or {}).get("results", {}).items()}
    return {"results": results, "headline": headline({"results": results}), "tasks": names,
            "limit": limit, "num_fewshot": num_fewshot}


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line with the ``megatron-kd`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
