"""``megatron-kd pretrain --config cfg.yaml [key.sub=value ...]``: pre-train a GPT model."""
from __future__ import annotations

import argparse

from megatron_kd.commands._flags import flag


def run(args: argparse.Namespace) -> int:
    """Load and validate the config, then train (or, with --dry-run, only validate)."""
    from megatron_kd.config import load_config, resolved_yaml
    from megatron_kd.training.config import PretrainConfig
    from megatron_kd.training.pretrain import prepare_config, run_pretrain
    import megatron_kd.interop.source  # noqa: F401 - checkpoint.load may name a Hugging Face model directory

    overrides = list(args.overrides) + (["logging.quiet=true"] if args.no_progress else [])
    overrides += ["data.verify_data=true"] if args.verify_data else []
    cfg = load_config(PretrainConfig, args.config, overrides)
    if args.dry_run:
        print(resolved_yaml(cfg, resolved_model=prepare_config(cfg).to_dict()))
        return 0
    result = run_pretrain(cfg)
    return 0 if result["iteration"] > 0 else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` sub-command."""
    p = subparsers.add_parser(
        "pretrain", help="pre-train a GPT model (megatron-core; torchrun for several processes)",
        description="Pre-train a GPT model on indexed or synthetic data. Launch with plain python for one "
                    "process, or torchrun --nproc-per-node N (multi-node: --nnodes, --rdzv-endpoint). "
                    "Resumes automatically from checkpoint.save when it holds a checkpoint.",
    )
    p.add_argument("--config", default=None, help="YAML file with a PretrainConfig (default: built-in defaults)")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print it resolved, and exit")
    p.add_argument("--verify-data", action="store_true", help="check every token id and the data files' sha256 "
                   "before training (default: a fast sampled check) = data.verify_data=true")
    flag(p, "--no-progress", action="store_true", help="no progress bar (= logging.quiet=true)")
    p.add_argument("overrides", nargs="*", default=[], help="config overrides like train.train_iters=100")
    p.set_defaults(func=run, config_class="megatron_kd.training.config:PretrainConfig")
