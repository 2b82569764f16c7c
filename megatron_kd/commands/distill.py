"""``megatron-kd distill --config cfg.yaml [key.sub=value ...]``: train a student with knowledge distillation."""
from __future__ import annotations

import argparse

from megatron_kd.commands._flags import flag


def run(args: argparse.Namespace) -> int:
    """Load and validate the config, then distil (or, with --dry-run, only validate)."""
    from megatron_kd.config import load_config, resolved_yaml
    from megatron_kd.distill.config import DistillConfig
    from megatron_kd.distill.run import prepare_distill_config, run_distill

    overrides = list(args.overrides) + (["logging.quiet=true"] if args.no_progress else [])
    overrides += ["data.verify_data=true"] if args.verify_data else []
    cfg = load_config(DistillConfig, args.config, overrides)
    if args.dry_run:
        model_cfg, spec = prepare_distill_config(cfg)
        teacher = None if spec is None else {"path": spec.path, "iteration": spec.iteration,
                                             "model": spec.model_config.to_dict(),
                                             "kd_vocab_size": int(spec.vocab.kd_vocab_size)}
        print(resolved_yaml(cfg, resolved_model=model_cfg.to_dict(), resolved_teacher=teacher))
        return 0
    result = run_distill(cfg)
    return 0 if result["iteration"] > 0 else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``distill`` sub-command."""
    p = subparsers.add_parser(
        "distill", help="train a student by knowledge distillation (online teacher, logits store, or none)",
        description="Train a GPT student with logit distillation: kd.mode=online runs a frozen teacher "
                    "(teacher.load) on the same TP/PP grid; kd.mode=offline reads stored top-k teacher targets "
                    "(kd.logits_store); kd.mode=none trains the student alone (baseline). Launch with plain "
                    "python for one process or torchrun --nproc-per-node N. Resumes automatically from "
                    "checkpoint.save when it holds a checkpoint (the teacher is reloaded from teacher.load).",
    )
    p.add_argument("--config", default=None, help="YAML file with a DistillConfig (default: built-in defaults)")
    p.add_argument("--dry-run", action="store_true", help="validate the config (and the teacher checkpoint), "
                   "print it resolved, and exit")
    p.add_argument("--verify-data", action="store_true", help="check every token id and the data files' sha256 "
                   "before training (default: a fast sampled check) = data.verify_data=true")
    flag(p, "--no-progress", action="store_true", help="no progress bar (= logging.quiet=true)")
    p.add_argument("overrides", nargs="*", default=[], help="config overrides like kd.alpha=0.9 teacher.dtype=bf16")
    p.set_defaults(func=run, config_class="megatron_kd.distill.config:DistillConfig")
