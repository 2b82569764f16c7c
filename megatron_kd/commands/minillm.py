"""``megatron-kd preprocess-instructions | sft | generate | minillm | onpolicy``: instruction-tuning distillation.

* ``preprocess-instructions``: JSONL {prompt, response, input?} -> prompt/response indexed datasets.
* ``sft``: SFT baseline / word-level KD (``sft.kd_ratio>0``) / SeqKD (SFT on ``generate`` output).
* ``generate``: a checkpoint answers the prompts of a JSONL (SeqKD data), written as a new JSONL.
* ``minillm``: reverse-KL policy-gradient distillation (MiniLLM) from an SFT-initialised student.
* ``onpolicy``: GKD (generalised JSD on student samples) or DistiLLM (skew KL, adaptive replay).
"""
from __future__ import annotations

import argparse

from megatron_kd.commands._flags import flag


def _template(name: str):
    from megatron_kd.posttrain.data import InstructionTemplate

    if name == "dolly":
        return InstructionTemplate()
    if name == "raw":
        return InstructionTemplate.raw()
    if "{prompt}" not in name:
        raise ValueError(f"--template {name!r} must be dolly, raw, or a format string containing {{prompt}}")
    return InstructionTemplate(template=name, template_with_input=name + "\n{input}")


def _preprocess(args) -> int:
    from megatron_kd.posttrain.data import preprocess_instructions
    from megatron_kd.posttrain.run import load_any_tokenizer

    tok = load_any_tokenizer(args.tokenizer)
    m = preprocess_instructions(args.input, tok, args.output_prefix, _template(args.template),
                                args.max_prompt_length or None, args.max_response_length or None, args.overwrite)
    print(f"preprocess-instructions: {m['num_examples']} examples, {m['num_prompt_tokens']} prompt + "
          f"{m['num_response_tokens']} response tokens -> {args.output_prefix}_{{prompt,response}}_document")
    return 0


def _checked(cfg):
    """Before any work: a hyper-parameter given as null (or not a number) and a non-positive or
    inverted learning rate are one-line errors naming the key (issue 19), not a TypeError later."""
    import dataclasses
    import typing

    from megatron_kd.config import DERIVED
    from megatron_kd.training.config import OptimConfig

    iters = cfg.train.train_iters

    def walk(obj, prefix: str) -> None:
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            if f.metadata.get(DERIVED):
                continue
            value, key = getattr(obj, f.name), prefix + f.name
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                walk(value, key + ".")
            elif hints.get(f.name) in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                shown = "null" if value is None else repr(value)
                raise ValueError(f"{key}={shown} must be a number: set it or remove it to use the default")
        if isinstance(obj, OptimConfig):
            if obj.lr <= 0:
                raise ValueError(f"{prefix}lr={obj.lr} must be > 0")
            if not 0 <= obj.min_lr <= obj.lr:
                raise ValueError(f"{prefix}min_lr={obj.min_lr} must be between 0 and {prefix}lr={obj.lr}")
            if isinstance(iters, int) and iters > 0 and obj.warmup_iters >= iters:  # megatron's scheduler would assert
                raise ValueError(f"{prefix}warmup_iters={obj.warmup_iters} must be < train.train_iters={iters}")

    walk(cfg, "")
    return cfg


def _train(args, config_class: str, prepare: str, run: str) -> int:
    """Load the config, make the command's early checks (``prepare_*``: files, vocabularies, batch
    layout, resume point); with ``--dry-run`` print the resolved plan and stop, else run."""
    from megatron_kd.config import load_config, resolved_yaml
    from megatron_kd.posttrain import run as posttrain_run

    cfg = _checked(load_config(getattr(posttrain_run, config_class), args.config, _overrides(args)))
    if args.dry_run:
        print(resolved_yaml(cfg, **getattr(posttrain_run, prepare)(cfg).shown()))
        return 0
    getattr(posttrain_run, run)(cfg)
    return 0


def _sft(args) -> int:
    return _train(args, "SFTRunConfig", "prepare_sft", "run_sft")


def _minillm(args) -> int:
    return _train(args, "MiniLLMRunConfig", "prepare_minillm", "run_minillm")


def _onpolicy(args) -> int:
    return _train(args, "OnPolicyRunConfig", "prepare_onpolicy", "run_onpolicy")


def _generate(args) -> int:
    from megatron_kd.posttrain.generation import GenerationConfig
    from megatron_kd.posttrain.run import run_generate
    from megatron_kd.posttrain.sampling import SamplingConfig
    from megatron_kd.runtime import ParallelConfig

    samp = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy)
    samp.validate()
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, sampling=samp, seed=args.seed)
    run_generate(args.checkpoint, args.input, args.output, args.tokenizer, gen, _template(args.template),
                 ParallelConfig(args.tensor_parallel, args.pipeline_parallel), args.batch_size,
                 args.max_prompt_length, args.limit or None, args.params_dtype)
    return 0


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config file (see examples/minillm/ and --help-config)")
    p.add_argument("--dry-run", action="store_true", help="make the early checks a run makes (checkpoints, tokenizer, "
                   "data, student/teacher vocabulary, batch layout, resume point), print the resolved plan, and exit")
    flag(p, "--no-progress", action="store_true", help="no progress bar (= logging.quiet=true)")
    p.add_argument("overrides", nargs="*", default=[],
                   help="key.sub=value overrides, e.g. train.train_iters=100 checkpoint.save=runs/x ppo.epochs=2")


def _overrides(args) -> list[str]:
    return list(args.overrides) + (["logging.quiet=true"] if args.no_progress else [])


def register(subparsers) -> None:
    """Add the instruction-distillation sub-commands."""
    p = subparsers.add_parser("preprocess-instructions", help="tokenise instruction JSONL into indexed datasets")
    p.add_argument("--input", required=True, help="JSONL with prompt/response (and optional input) fields")
    p.add_argument("--tokenizer", required=True, help="tokenizer (.model, HF directory, or word-list .json)")
    p.add_argument("--output-prefix", required=True, help="output prefix: PREFIX_{prompt,response}_document.*")
    p.add_argument("--template", default="dolly", help="dolly | raw | a format string with {prompt} (default dolly)")
    p.add_argument("--max-prompt-length", type=int, default=256, help="truncate prompts from the left (0 = off)")
    p.add_argument("--max-response-length", type=int, default=0, help="truncate responses (0 = off)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=_preprocess)

    p = subparsers.add_parser("sft", help="SFT / word-level KD baseline on instruction data")
    _config_args(p)
    p.set_defaults(func=_sft, config_class="megatron_kd.posttrain.run:SFTRunConfig")

    p = subparsers.add_parser("minillm", help="MiniLLM: reverse-KL policy-gradient distillation")
    _config_args(p)
    p.set_defaults(func=_minillm, config_class="megatron_kd.posttrain.run:MiniLLMRunConfig")

    p = subparsers.add_parser("onpolicy", help="GKD or DistiLLM on-policy distillation (onpolicy.method=...)")
    _config_args(p)
    p.set_defaults(func=_onpolicy, config_class="megatron_kd.posttrain.run:OnPolicyRunConfig")

    p = subparsers.add_parser("generate", help="answer a JSONL's prompts with a checkpoint (SeqKD data)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory of the generating model")
    p.add_argument("--input", required=True, help="instruction JSONL whose prompts are answered")
    p.add_argument("--output", required=True, help="output JSONL (response replaced, gold kept as gold_response)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: recorded in the checkpoint)")
    p.add_argument("--template", default="dolly", help="prompt template: dolly | raw | format string")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest response (default 256)")
    p.add_argument("--max-prompt-length", type=int, default=256, help="prompts truncated from the left")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (SeqKD reference: 1)")
    p.add_argument("--top-k", type=int, default=0, help="top-k filter (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="top-p filter (1 = off)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch per rank")
    p.add_argument("--limit", type=int, default=0, help="only the first N records (0 = all)")
    p.add_argument("--tensor-parallel", type=int, default=1, help="TP size (launch with torchrun)")
    p.add_argument("--pipeline-parallel", type=int, default=1, help="PP size (launch with torchrun)")
    p.add_argument("--params-dtype", default="fp32", help="fp32 | bf16")
    p.set_defaults(func=_generate)
