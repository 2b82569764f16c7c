"""Pre-training configs: dataclass trees loaded by :func:`megatron_kd.config.load_config`.

``PretrainConfig`` is the whole of ``megatron-kd pretrain --config cfg.yaml [key.sub=value ...]``.
:func:`validate_pretrain_config` checks everything that can be checked without building a model
(batch arithmetic, parallel layout against the model and the world size, schedule fractions,
data source) and raises a one-line ``ValueError`` naming the key and the fix.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from megatron_kd.config import validate_choices
from megatron_kd.data.gpt_dataset import DataConfig
from megatron_kd.models.config import ModelConfig
from megatron_kd.models.presets import get_preset
from megatron_kd.runtime.distributed import ParallelConfig
from megatron_kd.training.trackers import check_trackers


@dataclass
class TrainScheduleConfig:
    """The `train:` keys every training command shares (pretrain, distill, sft, minillm, onpolicy): length
    of the run, evaluation and logging cadence, stop conditions, seed."""

    train_iters: int = 100
    """Optimizer steps of the whole run (the LR schedule spans them)."""
    eval_interval: int = 0
    """Evaluate every this many steps (0 = only at the end; pretrain/distill evaluate only with eval_iters > 0)."""
    log_interval: int = 10
    """Print one rank-0 progress line every this many steps (the JSONL metrics get every step)."""
    seed: int = 1234
    """Seed of weights initialisation, dropout and data order."""
    exit_interval: int = 0
    """Stop (after checkpointing) once the iteration count is a multiple of this (0 = run to the end);
    for jobs split over several time-limited allocations."""
    exit_duration_mins: float = 0.0
    """Stop (after checkpointing) once this many minutes of training have passed (0 = no limit);
    set it a little below a Slurm time limit so every allocation ends with a checkpoint."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """What a NaN/inf loss or gradient norm does (checked every step): "stop" = exit with code 3 and
    one line naming the step and the likely cause, without saving that state; "skip" = drop the
    update (the step still counts), report it as `nonfinite_skipped` in the metrics, and stop only
    after `nonfinite_max_consecutive` such steps in a row."""
    nonfinite_max_consecutive: int = 10
    """With nonfinite=skip: stop (exit code 3) after this many consecutive non-finite steps."""


@dataclass
class TrainConfig(TrainScheduleConfig):
    """Batch sizes, length of the run, evaluation and logging cadence (the shared schedule keys of
    :class:`TrainScheduleConfig` plus the batch arithmetic of a fixed-length token stream)."""

    micro_batch_size: int = 4
    """Sequences per micro-batch per data-parallel rank (one forward/backward of the schedule)."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks; a multiple of micro_batch_size*DP.
    Gradient accumulation = global_batch_size / (micro_batch_size * DP) micro-batches."""
    seq_length: int = 128
    """Tokens per sequence."""
    eval_iters: int = 0
    """Global batches per evaluation (0 = no evaluation)."""
    fused_lm_loss: bool = True
    """pretrain: the output layer and the LM cross-entropy run chunk by chunk over the tokens, so the
    [tokens, V] logits are never held whole (the kernel of the distill step's LM term); false =
    megatron's full-logits cross-entropy. (distill steps follow kd.fused_linear instead.)"""


@dataclass
class OptimConfig:
    """AdamW, gradient clipping, learning-rate schedule, precision."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of the cosine / WSD decay."""
    weight_decay: float = 0.1
    """Decoupled (AdamW) weight decay; biases and norm weights are exempt."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient L2 norm to this value (0 = no clipping)."""
    lr_schedule: Literal["constant", "cosine", "linear", "wsd"] = "cosine"
    """constant | cosine | linear | wsd (warmup-stable-decay), all after a linear warmup."""
    warmup_fraction: float = 0.0
    """Linear warmup length as a fraction of train_iters (used when warmup_iters is 0)."""
    warmup_iters: int = 0
    """Linear warmup length in steps (wins over warmup_fraction when > 0)."""
    wsd_decay_fraction: float = 0.1
    """WSD: fraction of train_iters spent in the final decay (the stable phase is what is left)."""
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"
    """WSD decay shape."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """fp32, or mixed precision bf16 / fp16 with fp32 master weights (bf16/fp16 need a GPU)."""
    use_distributed_optimizer: bool = False
    """Shard the optimizer state over data-parallel ranks (ZeRO-1; GPU only, ignored on CPU with a note)."""
    initial_loss_scale: float = 65536.0
    """fp16 only: starting dynamic loss scale."""


@dataclass
class CheckpointConfig:
    """Where and when checkpoints are written and read."""

    save: Optional[str] = None
    """Directory to save checkpoints in (None = never save)."""
    save_interval: int = 0
    """Save every this many steps (0 = only at the end of the run)."""
    load: Optional[str] = None
    """Directory to resume from; None = the save directory when it holds a checkpoint."""
    keep_last: int = 0
    """Keep only the newest N iteration directories (0 = keep all)."""
    finetune: bool = False
    """Load only the model weights from `load` and start a fresh run (iteration 0, new optimizer)."""
    tokenizer: Optional[str] = None
    """Tokenizer path/reference recorded in the checkpoint (defaults to data.tokenizer)."""


@dataclass
class LoggingConfig:
    """Metrics outputs."""

    metrics_path: Optional[str] = None
    """JSONL metrics file (one record per step and per evaluation); None = `<checkpoint.save>/metrics.jsonl`."""
    tensorboard_dir: Optional[str] = None
    """Also write TensorBoard scalars here, named `SPLIT/NAME` after the JSONL records (`pip install megatron-kd[tb]`)."""
    wandb_project: Optional[str] = None
    """Also log to this Weights & Biases project, the same `SPLIT/NAME` scalars (`pip install megatron-kd[wandb]`)."""
    wandb_entity: Optional[str] = None
    """W&B entity (user or team); None = wandb's default."""
    wandb_name: Optional[str] = None
    """W&B run name; None = wandb's generated name."""
    wandb_dir: Optional[str] = None
    """Where wandb writes its files and the run id a resumed run continues; None = the metrics file's directory."""
    wandb_mode: Optional[Literal["online", "offline", "disabled"]] = None
    """`offline` logs with no network (`wandb sync` later); None = wandb's default or `WANDB_MODE`."""
    quiet: bool = False
    """No progress bar (the log lines are still printed)."""


@dataclass
class PretrainDataConfig(DataConfig):
    """The `data:` section: a :class:`megatron_kd.data.gpt_dataset.DataConfig` (every field of it can be
    set from YAML: blend `weights`, `valid_prefixes`, `eod_mask_loss`, ...) with the pre-training
    defaults, `prefixes` as the short spelling of `train_prefixes`, and deterministic synthetic data.
    `seq_length` and `seed` default to train.seq_length / train.seed (one value per run)."""

    prefixes: list[str] = field(default_factory=list)
    """Indexed dataset path prefixes as written by `megatron-kd preprocess` (`{prefix}.bin/.idx`); the same
    list as `train_prefixes` (set either; both name the training blend)."""
    split: str = "969,30,1"
    """Train/valid/test split weights of every prefix's documents (ignored with `valid_prefixes`)."""
    tokenizer: Optional[str] = None
    """Tokenizer the datasets were made with (SentencePiece .model file or HF directory)."""
    seq_length: Optional[int] = None
    """Tokens per sample; None = train.seq_length (a different value is refused)."""
    seed: Optional[int] = None
    """Seed of the document and sample shuffles; None = train.seed."""
    synthetic: bool = False
    """Use deterministic synthetic token sequences (a fixed random Markov chain over model.vocab_size):
    sample i depends only on (seed, i). For tests and benchmarks."""
    synthetic_concentration: float = 0.9
    """Synthetic data: probability that the next token is the chain's preferred successor."""
    verify_data: bool = False
    """Before training, check every token id against the vocabulary and the files' sha256 against
    their manifest (`--verify-data`); by default a fast sampled check of the token ids runs."""

    def __post_init__(self) -> None:
        if self.prefixes and self.train_prefixes and list(self.prefixes) != list(self.train_prefixes):
            raise ValueError("data.prefixes and data.train_prefixes name the same list: set only one of them")
        self.train_prefixes = list(self.train_prefixes or self.prefixes)
        self.prefixes = list(self.train_prefixes)
        if self.train_prefixes:  # DataConfig's own checks (split, weights, ...) on the indexed-data path
            self.dataset_config(self.seq_length or 1, 0 if self.seed is None else self.seed)

    def dataset_config(self, seq_length: int, seed: int) -> DataConfig:
        """The plain :class:`DataConfig` for ``build_gpt_datasets``: every field of this section, with
        ``seq_length`` / ``seed`` resolved (given as train.seq_length / train.seed)."""
        if self.seq_length is not None and self.seq_length != seq_length:
            raise ValueError(f"data.seq_length={self.seq_length} differs from train.seq_length={seq_length}: "
                             "unset data.seq_length (it defaults to train.seq_length)")
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(DataConfig)}
        values.update(seq_length=seq_length, seed=seed if self.seed is None else self.seed,
                      tokenizer=self.tokenizer or "", synthetic=False)
        return DataConfig(**values)


@dataclass
class ModelSpec:
    """The `model:` section: `preset` (a name from megatron_kd.models.presets) and/or any ModelConfig
    field, which overrides the preset. Every field but `preset` mirrors the ModelConfig field of the
    same name (None = the preset's value, else ModelConfig's default); its documentation is
    ModelConfig's (``--help-config`` shows it). tests/cli/test_config_vocabulary.py checks that the
    two field lists agree: add a field to both."""

    _field_docs_from = ModelConfig  # --help-config: undocumented fields take ModelConfig's docstrings
    _scalar_key = "preset"  # `model: tiny` in YAML = `model: {preset: tiny}`

    preset: Optional[str] = None
    """Preset name (megatron_kd.models.presets, e.g. tiny, qwen2.5-0.5b); None = ModelConfig defaults."""
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    kv_channels: Optional[int] = None
    vocab_size: Optional[int] = None
    make_vocab_size_divisible_by: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    rotary_base: Optional[float] = None
    rope_scaling: Optional[bool] = None
    rope_scaling_factor: Optional[float] = None
    norm_epsilon: Optional[float] = None
    tie_embeddings: Optional[bool] = None
    add_qkv_bias: Optional[bool] = None
    qk_layernorm: Optional[bool] = None
    init_method_std: Optional[float] = None
    hidden_dropout: Optional[float] = None
    attention_dropout: Optional[float] = None
    num_moe_experts: Optional[int] = None
    moe_router_topk: Optional[int] = None
    moe_router_pre_softmax: Optional[bool] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_shared_expert_gate: Optional[bool] = None
    moe_layer_pattern: Optional[list[int]] = None
    moe_aux_loss_coeff: Optional[float] = None
    moe_router_dtype: Optional[str] = None
    moe_token_dispatcher_type: Optional[str] = None


def resolve_model_config(spec: Any) -> ModelConfig:
    """``ModelSpec`` (or a ModelConfig) -> ``ModelConfig``: the preset, then the explicit fields."""
    if isinstance(spec, ModelConfig):
        return spec
    values = {k: v for k, v in dataclasses.asdict(spec).items() if v is not None and k != "preset"}
    if spec.preset:
        return get_preset(spec.preset, **values)
    return ModelConfig(**values)


@dataclass
class PretrainConfig:
    """Everything `megatron-kd pretrain` needs."""

    model: ModelSpec = field(default_factory=ModelSpec)
    """Model shape: `preset` and/or ModelConfig fields."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline parallel sizes (data parallel = the rest of the world size)."""
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    """Training data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batch sizes and run length."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint saving and resuming."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics outputs."""


def require_numbers(section: str, obj: Any, names: tuple[str, ...]) -> None:
    """One-line ``ValueError`` for a numeric setting given as null / not a number (e.g. ``lr=null``)."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            shown = "null" if value is None else repr(value)
            raise ValueError(f"{section}.{name}={shown} must be a number: set it or remove it to use the default")


SCHEDULE_COUNTS = ("eval_interval", "log_interval", "exit_interval", "exit_duration_mins")
"""Schedule keys that must be >= 0 (0 = off)."""


def validate_schedule(train: TrainScheduleConfig, min_iters: int = 1) -> None:
    """Check the shared `train` schedule keys (one-line ValueError naming the key)."""
    require_numbers("train", train, ("train_iters", "seed", *SCHEDULE_COUNTS, "nonfinite_max_consecutive"))
    validate_choices(train, "train.")
    if train.nonfinite_max_consecutive < 1:
        raise ValueError(f"train.nonfinite_max_consecutive={train.nonfinite_max_consecutive} must be >= 1")
    if train.train_iters < min_iters:
        raise ValueError(f"train.train_iters={train.train_iters} must be >= {min_iters}")
    for name in SCHEDULE_COUNTS:
        if getattr(train, name) < 0:
            raise ValueError(f"train.{name}={getattr(train, name)} must be >= 0")


def validate_train(train: TrainConfig, data_parallel: int) -> int:
    """Check batch arithmetic; return the number of micro-batches per step per DP rank."""
    validate_schedule(train)
    require_numbers("train", train, ("micro_batch_size", "global_batch_size", "seq_length", "eval_iters"))
    for name in ("micro_batch_size", "global_batch_size", "seq_length"):
        if getattr(train, name) < 1:
            raise ValueError(f"train.{name}={getattr(train, name)} must be >= 1")
    if train.eval_iters < 0:
        raise ValueError(f"train.eval_iters={train.eval_iters} must be >= 0")
    per_round = train.micro_batch_size * data_parallel
    if train.global_batch_size % per_round:
        raise ValueError(
            f"train.global_batch_size={train.global_batch_size} is not a multiple of train.micro_batch_size"
            f"*data_parallel={train.micro_batch_size}*{data_parallel}={per_round}: change one of them"
        )
    return train.global_batch_size // per_round


def validate_optim(optim: OptimConfig, train_iters: int, on_gpu: bool) -> None:
    """Check the optimizer / schedule / precision settings."""
    require_numbers("optim", optim, ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
                                     "clip_grad", "warmup_fraction", "warmup_iters", "wsd_decay_fraction",
                                     "initial_loss_scale"))
    if not optim.lr > 0:
        raise ValueError(f"optim.lr={optim.lr} must be > 0")
    validate_choices(optim, "optim.")
    if optim.precision != "fp32" and not on_gpu:
        raise ValueError(
            f"optim.precision={optim.precision} needs a CUDA GPU (megatron-core's mixed-precision optimizer "
            "requires CUDA tensors): use optim.precision=fp32 on CPU"
        )
    if not 0 <= optim.min_lr <= optim.lr:
        raise ValueError(f"optim.min_lr={optim.min_lr} must be between 0 and optim.lr={optim.lr}")
    if not 0.0 <= optim.warmup_fraction < 1.0 or optim.warmup_iters < 0:
        raise ValueError("optim.warmup_fraction must be in [0, 1) and optim.warmup_iters >= 0")
    if not 0.0 < optim.wsd_decay_fraction <= 1.0:
        raise ValueError(f"optim.wsd_decay_fraction={optim.wsd_decay_fraction} must be in (0, 1]")
    if optim.clip_grad < 0:
        raise ValueError(f"optim.clip_grad={optim.clip_grad} must be >= 0 (0 disables clipping)")
    warmup = warmup_iters(optim, train_iters)
    if warmup >= train_iters:
        raise ValueError(f"warmup ({warmup} steps) must be shorter than train.train_iters={train_iters}")
    if optim.lr_schedule == "wsd" and warmup + wsd_decay_iters(optim, train_iters) > train_iters:
        raise ValueError(
            f"warmup ({warmup}) + WSD decay ({wsd_decay_iters(optim, train_iters)}) steps exceed "
            f"train.train_iters={train_iters}: lower optim.warmup_* or optim.wsd_decay_fraction"
        )


def warmup_iters(optim: OptimConfig, train_iters: int) -> int:
    """Warmup length in steps."""
    return optim.warmup_iters if optim.warmup_iters > 0 else int(round(optim.warmup_fraction * train_iters))


def wsd_decay_iters(optim: OptimConfig, train_iters: int) -> int:
    """WSD decay-phase length in steps (at least 1)."""
    return max(1, int(round(optim.wsd_decay_fraction * train_iters)))


def validate_pretrain_config(cfg: PretrainConfig, world_size: int, on_gpu: bool) -> ModelConfig:
    """Check the whole config against ``world_size`` processes; return the resolved ModelConfig.

    Raises a one-line ``ValueError`` before anything heavy is built.
    """
    model_cfg = resolve_model_config(cfg.model)
    cfg.parallel.validate(world_size)
    if cfg.parallel.context_parallel != 1:
        raise ValueError("parallel.context_parallel must be 1: the local SDPA attention does not shard sequences")
    model_cfg.validate_parallel(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel)
    dp = world_size // (cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel)
    validate_train(cfg.train, dp)
    if cfg.train.seq_length > model_cfg.max_position_embeddings:
        raise ValueError(f"train.seq_length={cfg.train.seq_length} exceeds model.max_position_embeddings="
                         f"{model_cfg.max_position_embeddings}")
    validate_optim(cfg.optim, cfg.train.train_iters, on_gpu)
    if cfg.data.synthetic == bool(cfg.data.prefixes):
        raise ValueError("set exactly one data source: data.synthetic=true or data.prefixes=[...] "
                         "(indexed datasets from megatron-kd preprocess)")
    if cfg.data.prefixes and not cfg.data.tokenizer:
        raise ValueError("data.tokenizer is required with data.prefixes: the tokenizer the data was made with")
    if cfg.checkpoint.save_interval < 0 or cfg.checkpoint.keep_last < 0:
        raise ValueError("checkpoint.save_interval and checkpoint.keep_last must be >= 0")
    if cfg.checkpoint.finetune and not cfg.checkpoint.load:
        raise ValueError("checkpoint.finetune=true needs checkpoint.load=<dir> with the weights to start from")
    check_trackers(cfg.logging)
    return model_cfg
