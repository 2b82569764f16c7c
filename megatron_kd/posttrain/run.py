"""Command drivers of post-training: config dataclasses, model/tokenizer/data loading, one Trainer.

``megatron-kd sft`` -> :func:`run_sft`, ``minillm`` -> :func:`run_minillm`, ``onpolicy`` ->
:func:`run_onpolicy`, ``generate`` -> :func:`run_generate` (see :mod:`megatron_kd.commands.minillm`).
Every training command builds its student on the shared stack (``training.model_setup`` /
``training.optim``) and runs :class:`megatron_kd.training.loop.Trainer` with its step and batch
source: iterations, evaluation and save cadence, resume (``checkpoint.save`` holding a checkpoint),
metrics (``<checkpoint.save>/metrics.jsonl``, split ``train`` per step and ``valid`` per evaluation),
SIGTERM (save, exit 75), ``train.exit_interval``, ``checkpoint.keep_last`` and the resolved
``config.yaml`` are the Trainer's. Run control is spelled as in ``pretrain``: ``train.*`` (a
:class:`~megatron_kd.training.config.TrainScheduleConfig`), ``checkpoint.*``, ``logging.*``; the old
flat spellings (``save``, ``total_steps``, ``sft.seed``, ...) are accepted with a one-line note.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_kd.posttrain.config import (RUN_KEY_MOVES, MiniLLMCheckpointConfig, MiniLLMScheduleConfig,
                                         OnPolicyScheduleConfig, PostTrainCheckpointConfig, SFTScheduleConfig,
                                         deprecation_note, move_keys)
from megatron_kd.posttrain.data import InstructionDataset, LMChunks
from megatron_kd.posttrain.evaluate import EvalConfig
from megatron_kd.posttrain.minillm import TrainLoopConfig, validate_loop_config
from megatron_kd.posttrain.onpolicy import OnPolicyConfig
from megatron_kd.posttrain.sft import SFTConfig
from megatron_kd.runtime.distributed import ParallelConfig, init_distributed, is_main_process, set_seed
from megatron_kd.training.checkpoint import checkpoint_tokenizer
from megatron_kd.training.config import LoggingConfig, ModelSpec
from megatron_kd.utils.progress import progress


def load_any_tokenizer(path: str):
    """A word-list JSON (synthetic demos) or anything ``megatron_kd.data.tokenizers`` loads."""
    if path is None:
        raise ValueError("no tokenizer: pass tokenizer=PATH (or use a checkpoint that records one)")
    if str(path).endswith(".json") and Path(path).is_file():
        from megatron_kd.posttrain.synthetic import WordTokenizer

        return WordTokenizer.load(path)
    from megatron_kd.data.tokenizers import load_tokenizer

    return load_tokenizer(path)


def _moves(section: str) -> dict[str, str]:
    """Old flat spellings of a post-training command -> the shared names (``section``: the command's own
    section that held ``total_steps`` / ``seed``; "" = the top level)."""
    own = {"total_steps": "train.train_iters", "seed": "train.seed"}
    return {**RUN_KEY_MOVES, **{(section + "." if section else "") + k: v for k, v in own.items()}}


@dataclass
class MiniLLMRunConfig(TrainLoopConfig):
    """``megatron-kd minillm`` (YAML + ``key.sub=value`` overrides). Loop settings: see TrainLoopConfig."""

    student: str = ""
    """Checkpoint directory of the SFT-initialised student (stage 1)."""
    teacher: str = ""
    """Checkpoint directory of the teacher (same tokenizer and padded vocabulary)."""
    tokenizer: Optional[str] = None
    """Tokenizer path; default: the one recorded in the student checkpoint."""
    train_data: str = ""
    """Prefix of the preprocessed instruction dataset (prompts are used)."""
    eval_data: Optional[str] = None
    """Prefix of a held-out instruction dataset (ROUGE-L, reverse KL)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline parallel sizes (pipeline must be 1 for training)."""
    params_dtype: str = "fp32"
    """fp32 | bf16 for both models."""
    train: MiniLLMScheduleConfig = field(default_factory=MiniLLMScheduleConfig)
    """Run length, evaluation / log cadence, stop conditions, seed (pretrain's `train` keys)."""
    checkpoint: MiniLLMCheckpointConfig = field(default_factory=MiniLLMCheckpointConfig)
    """Where and when checkpoints are written (pretrain's `checkpoint` keys)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics outputs (metrics_path default `<checkpoint.save>/metrics.jsonl`, TensorBoard, W&B, quiet)."""

    def __post_init__(self) -> None:
        self.sync()

    def sync(self) -> None:
        """Copy train.train_iters / train.seed into the loop settings the algorithm reads."""
        self.total_steps, self.seed = self.train.train_iters, self.train.seed

    @classmethod
    def _normalise_keys(cls, data: dict[str, Any], prefix: str) -> dict[str, Any]:
        return move_keys(data, prefix, _moves(""))


@dataclass
class SFTRunConfig:
    """``megatron-kd sft``: SFT baseline, word-level KD (sft.kd_ratio > 0), SeqKD (SFT on teacher data)."""

    student: str = ""
    """Checkpoint directory to start from (the student's pre-trained weights)."""
    model: Optional[ModelSpec] = None
    """Instead of ``student``: a model trained from random weights: `preset` and/or ModelConfig fields
    (`model: tiny` = `model: {preset: tiny}`; `model_overrides.X` is the old spelling of `model.X`)."""
    teacher: Optional[str] = None
    """Teacher checkpoint for word-level KD (needed when sft.kd_ratio > 0)."""
    tokenizer: Optional[str] = None
    """Tokenizer path; default: the one recorded in the student checkpoint."""
    train_data: str = ""
    """Prefix of the preprocessed instruction dataset."""
    valid_data: Optional[str] = None
    """Prefix of a validation instruction dataset (response-token loss `lm`, split `valid`)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline parallel sizes (pipeline must be 1)."""
    params_dtype: str = "fp32"
    """fp32 | bf16."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Optimisation settings."""
    train: SFTScheduleConfig = field(default_factory=SFTScheduleConfig)
    """Run length, evaluation / log cadence, stop conditions, seed (pretrain's `train` keys)."""
    checkpoint: PostTrainCheckpointConfig = field(default_factory=PostTrainCheckpointConfig)
    """Where and when checkpoints are written (pretrain's `checkpoint` keys)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics outputs (metrics_path default `<checkpoint.save>/metrics.jsonl`, TensorBoard, W&B, quiet)."""

    def __post_init__(self) -> None:
        self.sync()

    def sync(self) -> None:
        """Copy train.train_iters / train.seed into the sft settings the algorithm reads."""
        self.sft.total_steps, self.sft.seed = self.train.train_iters, self.train.seed

    @classmethod
    def _normalise_keys(cls, data: dict[str, Any], prefix: str) -> dict[str, Any]:
        data = move_keys(data, prefix, _moves("sft"))
        if "model_overrides" in data:
            deprecation_note(prefix + "model_overrides", prefix + "model")
            extra = data.pop("model_overrides") or {}
            model = data.get("model")
            model = {"preset": model} if isinstance(model, str) else dict(model or {})
            data["model"] = {**model, **extra}
        return data


@dataclass
class OnPolicyRunConfig:
    """``megatron-kd onpolicy``: GKD (onpolicy.method=gkd) or DistiLLM (onpolicy.method=distillm)."""

    student: str = ""
    """Checkpoint directory of the (SFT-initialised) student."""
    teacher: str = ""
    """Teacher checkpoint directory (same tokenizer and padded vocabulary)."""
    tokenizer: Optional[str] = None
    """Tokenizer path; default: the one recorded in the student checkpoint."""
    train_data: str = ""
    """Prefix of the preprocessed instruction dataset."""
    valid_data: Optional[str] = None
    """Validation instruction dataset: divergence on gold responses (DistiLLM's adaptive threshold)."""
    eval_data: Optional[str] = None
    """Held-out instruction dataset for ROUGE-L and exact reverse KL."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline parallel sizes (pipeline must be 1)."""
    params_dtype: str = "fp32"
    """fp32 | bf16."""
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    """GKD / DistiLLM settings."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """ROUGE-L / reverse-KL evaluation settings."""
    train: OnPolicyScheduleConfig = field(default_factory=OnPolicyScheduleConfig)
    """Run length, evaluation / log cadence, stop conditions, seed (pretrain's `train` keys)."""
    checkpoint: PostTrainCheckpointConfig = field(default_factory=PostTrainCheckpointConfig)
    """Where and when checkpoints are written (pretrain's `checkpoint` keys)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics outputs (metrics_path default `<checkpoint.save>/metrics.jsonl`, TensorBoard, W&B, quiet)."""

    def __post_init__(self) -> None:
        self.sync()

    def sync(self) -> None:
        """Copy train.train_iters / train.seed into the onpolicy settings the algorithm reads."""
        self.onpolicy.total_steps, self.onpolicy.seed = self.train.train_iters, self.train.seed

    @classmethod
    def _normalise_keys(cls, data: dict[str, Any], prefix: str) -> dict[str, Any]:
        return move_keys(data, prefix, _moves("onpolicy"))


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class PostTrainPlan:
    """What a post-training command resolved from its config before building anything: the one
    validated plan the run builds from, and what ``--dry-run`` prints (:meth:`shown`)."""

    model: Any
    """The student's ModelConfig (from its checkpoint, or sft's `model` preset + the tokenizer's vocabulary)."""
    tokenizer: Any
    """The loaded tokenizer (the student checkpoint's, or `tokenizer`)."""
    vocab_size: int
    """Real vocabulary the losses and samplers run over (columns beyond are masked)."""
    data_parallel: int
    """Data-parallel size of this launch (WORLD_SIZE / (TP * PP))."""
    train_iters: int
    """Optimizer steps of the run (sft with train.train_iters=0: sft.epochs passes)."""
    datasets: dict[str, Any]
    """Opened instruction datasets by config key (train_data, valid_data, eval_data)."""
    student_meta: Optional[dict] = None
    """The student checkpoint's meta (None: sft from a preset)."""
    teacher: Any = None
    """The teacher's ModelConfig (None without a teacher)."""
    teacher_meta: Optional[dict] = None
    """The teacher checkpoint's meta."""
    resume: Optional[dict] = None
    """The checkpoint the run starts from (`checkpoint.save` holding one, else `checkpoint.load`), or None."""

    def shown(self) -> dict[str, Any]:
        """``resolved_*`` sections of ``--dry-run`` (as pretrain / distill print them)."""
        teacher = None
        if self.teacher is not None:
            teacher = {"path": self.teacher_meta["path"], "iteration": int(self.teacher_meta["iteration"]),
                       "model": self.teacher.to_dict(), "padded_vocab_size": int(self.teacher_meta["padded_vocab_size"])}
        return {"resolved_model": self.model.to_dict(), "resolved_teacher": teacher,
                "resolved_plan": {"tokenizer": getattr(self.tokenizer, "path", None) or None,
                                  "tokenizer_vocab_size": int(self.tokenizer.vocab_size),
                                  "vocab_size": int(self.vocab_size), "data_parallel": self.data_parallel,
                                  "train_iters": self.train_iters,
                                  "examples": {k: len(v) for k, v in self.datasets.items()},
                                  "resume_from": self.resume}}


def _data_parallel(cfg) -> int:
    """The data-parallel size of this launch (torchrun's WORLD_SIZE), after checking the layout."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.parallel.validate(world)
    return world // (cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel)


def _checkpoint_meta(path: str, key: str) -> dict:
    """The meta of the checkpoint ``key=path`` names (one-line error when there is none)."""
    from megatron_kd.training.checkpoint import has_checkpoint, read_checkpoint_meta

    if not has_checkpoint(path):
        raise FileNotFoundError(f"{key}={path} holds no checkpoint (no 'latest' file): pass a directory written by "
                                "megatron-kd pretrain/distill/sft/minillm/onpolicy or convert")
    return read_checkpoint_meta(path)


def _vocab(student_cfg, teacher_cfg, tokenizer, s_meta, t_meta) -> int:
    if teacher_cfg is not None and s_meta["padded_vocab_size"] != t_meta["padded_vocab_size"]:
        raise ValueError(f"student padded vocab {s_meta['padded_vocab_size']} != teacher padded vocab "
                         f"{t_meta['padded_vocab_size']}: convert both with the same padded vocabulary size")
    sizes = [student_cfg.vocab_size, tokenizer.vocab_size] + ([teacher_cfg.vocab_size] if teacher_cfg else [])
    return min(sizes)


def _check_teacher_tokenizer(teacher: str, t_meta: dict, tokenizer) -> None:
    """The teacher must score the student's token ids: when its checkpoint records a tokenizer, it must be
    the same vocabulary (same identity) as the run's."""
    from megatron_kd.training.checkpoint import checkpoint_tokenizer

    path = checkpoint_tokenizer(teacher, t_meta)
    if not path or not Path(path).exists():
        return
    t_tok = load_any_tokenizer(path)
    if t_tok.identity != tokenizer.identity:
        raise ValueError(f"teacher {teacher} was trained with tokenizer {path}, not the run's "
                         f"{getattr(tokenizer, 'path', '') or tokenizer.identity}: post-training distillation needs "
                         "one tokenizer (the same token ids) for student and teacher")


def _check_run(name: str, cfg) -> None:
    """The shared run-control keys (``train.*``, ``checkpoint.*``) of a post-training command config."""
    from megatron_kd.training.config import validate_schedule

    cfg.sync()
    validate_schedule(cfg.train, min_iters=0 if name == "sft" else 1)  # sft: 0 = sft.epochs passes
    for key in ("save_interval", "keep_last"):
        _require(getattr(cfg.checkpoint, key) >= 0, f"checkpoint.{key}={getattr(cfg.checkpoint, key)} must be >= 0")
    _require(bool(cfg.checkpoint.save), f"{name} needs checkpoint.save=DIR: set it in the YAML or as an override")
    _require(not cfg.checkpoint.finetune or bool(cfg.checkpoint.load),
             "checkpoint.finetune=true needs checkpoint.load=<dir> with the weights to start from")
    _require(cfg.parallel.pipeline_parallel == 1,
             f"{name} supports tensor and data parallelism only: set parallel.pipeline_parallel=1")
    _require(cfg.params_dtype in ("fp32", "bf16"), f"params_dtype={cfg.params_dtype!r} must be one of: fp32, bf16")


def _prepare(name: str, cfg, required: tuple[str, ...], data_keys: tuple[str, ...], teacher: bool,
             batches, iters=None) -> PostTrainPlan:
    """The early checks every post-training command makes before building anything (one-line errors):
    required keys, run control, the parallel layout, checkpoints / tokenizer / datasets exist, student
    and teacher share a tokenizer and padded vocabulary, batch sizes fit the layout, the outputs are
    writable and a checkpoint to resume from holds the same model. ``batches(dp)`` checks the command's
    batch settings; ``iters(datasets, dp)`` resolves the run length (default: train.train_iters)."""
    from megatron_kd.training.pretrain import check_outputs, check_resume_point

    for key in required:
        _require(bool(getattr(cfg, key)), f"{name} needs {key}=...: set it in the YAML or as an override")
    _check_run(name, cfg)
    dp = _data_parallel(cfg)
    batches(dp)
    s_meta = t_cfg = t_meta = None
    if getattr(cfg, "student", None):
        from megatron_kd.models.config import ModelConfig

        s_meta = _checkpoint_meta(cfg.student, "student")
        s_cfg = ModelConfig.from_dict(s_meta["model_config"])
        tok = load_any_tokenizer(checkpoint_tokenizer(cfg.student, s_meta, cfg.tokenizer))
    else:  # sft from a preset: the vocabulary follows the tokenizer unless model.vocab_size is set
        from dataclasses import replace

        from megatron_kd.training.config import resolve_model_config

        tok = load_any_tokenizer(cfg.tokenizer)
        s_cfg = resolve_model_config(cfg.model if cfg.model.vocab_size is not None
                                     else replace(cfg.model, vocab_size=tok.vocab_size))
        s_meta = {"padded_vocab_size": s_cfg.padded_vocab_size(cfg.parallel.tensor_parallel)}
    s_cfg.validate_parallel(cfg.parallel.tensor_parallel, 1)
    _require(s_meta["padded_vocab_size"] % cfg.parallel.tensor_parallel == 0,
             f"the student's padded vocabulary {s_meta['padded_vocab_size']} is not divisible by "
             f"parallel.tensor_parallel={cfg.parallel.tensor_parallel}: choose a TP size that divides it")
    if teacher:
        t_meta = _checkpoint_meta(cfg.teacher, "teacher")
        from megatron_kd.models.config import ModelConfig

        t_cfg = ModelConfig.from_dict(t_meta["model_config"])
        t_cfg.validate_parallel(cfg.parallel.tensor_parallel, 1)
        _check_teacher_tokenizer(cfg.teacher, t_meta, tok)
    vocab = _vocab(s_cfg, t_cfg, tok, s_meta, t_meta)
    datasets = {key: InstructionDataset(getattr(cfg, key), tok) for key in data_keys if getattr(cfg, key)}
    train_iters = iters(datasets, dp) if iters is not None else cfg.train.train_iters
    check_outputs(cfg.checkpoint, cfg.logging)
    resume = check_resume_point(cfg.checkpoint, s_cfg, cfg.parallel.tensor_parallel)
    return PostTrainPlan(model=s_cfg, tokenizer=tok, vocab_size=vocab, data_parallel=dp, train_iters=train_iters,
                         datasets=datasets, student_meta=s_meta if getattr(cfg, "student", None) else None,
                         teacher=t_cfg, teacher_meta=t_meta, resume=resume)


def prepare_minillm(cfg: MiniLLMRunConfig) -> PostTrainPlan:
    """Validate a ``minillm`` config for this launch (nothing built); the plan :func:`run_minillm` builds from."""
    def batches(dp: int) -> None:
        validate_loop_config(cfg, dp)
        if cfg.lm.data and cfg.lm.coef > 0:
            LMChunks.check_files(cfg.lm.data)

    return _prepare("minillm", cfg, ("student", "teacher", "train_data"), ("train_data", "eval_data"), True, batches)


def prepare_sft(cfg: SFTRunConfig) -> PostTrainPlan:
    """Validate an ``sft`` config for this launch (nothing built); the plan :func:`run_sft` builds from."""
    from megatron_kd.posttrain.sft import check_batches

    _require(bool(cfg.student) != bool(cfg.model), "sft needs exactly one of student=CKPT or model=PRESET")
    _require(bool(cfg.student) or bool(cfg.tokenizer), "sft with model=PRESET needs tokenizer=PATH")
    _require(cfg.sft.kd_ratio == 0 or bool(cfg.teacher), "sft.kd_ratio > 0 (word-level KD) needs teacher=CKPT")
    def iters(datasets, dp: int) -> int:
        total = check_batches(cfg.sft, dp, len(datasets["train_data"]))
        warmup = cfg.sft.optim.warmup_iters
        _require(warmup < total, f"sft.optim.warmup_iters={warmup} must be < the run's {total} steps "
                                 f"(train.train_iters, or sft.epochs={cfg.sft.epochs} passes over the data)")
        return total

    return _prepare("sft", cfg, ("train_data",), ("train_data", "valid_data"),
                    bool(cfg.teacher) and cfg.sft.kd_ratio > 0,
                    lambda dp: check_batches(cfg.sft, dp, None), iters)


def prepare_onpolicy(cfg: OnPolicyRunConfig) -> PostTrainPlan:
    """Validate an ``onpolicy`` config for this launch (nothing built); the plan :func:`run_onpolicy` builds from."""
    def batches(dp: int) -> None:
        cfg.onpolicy.validate()
        cfg.onpolicy.check_batches(dp)

    return _prepare("onpolicy", cfg, ("student", "teacher", "train_data"), ("train_data", "valid_data", "eval_data"),
                    True, batches)


def _load_student(ckpt: str, params_dtype: str, plan: PostTrainPlan):
    from megatron_kd.models.builder import build_gpt_model
    from megatron_kd.training.checkpoint import load_checkpoint

    meta = plan.student_meta
    model = build_gpt_model(plan.model, params_dtype=params_dtype, padded_vocab_size=meta["padded_vocab_size"])
    load_checkpoint(ckpt, [model], load_rng=False, meta=meta)
    return model


def _load_teacher(cfg, plan: PostTrainPlan):
    from megatron_kd.training.checkpoint import load_model_for_inference

    teacher, _, _ = load_model_for_inference(cfg.teacher, cfg.params_dtype, meta=plan.teacher_meta,
                                             model_config=plan.teacher)
    return teacher


def run_minillm(cfg: MiniLLMRunConfig) -> dict:
    """Stage-2 MiniLLM training from checkpoints; returns the last evaluation (rank-local copy)."""
    from megatron_kd.posttrain.evaluate import evaluate
    from megatron_kd.posttrain.minillm import PPOStep, RolloutSource
    from megatron_kd.posttrain.steps import dp_info, fit, setup_student

    plan = prepare_minillm(cfg)
    init_distributed(cfg.parallel)
    validate_loop_config(cfg, dp_info()[1])
    set_seed(cfg.seed)
    student, teacher = _load_student(cfg.student, cfg.params_dtype, plan), _load_teacher(cfg, plan)
    tok, vocab, s_cfg = plan.tokenizer, plan.vocab_size, plan.model
    train, evald = plan.datasets["train_data"], plan.datasets.get("eval_data")
    lm = None
    if cfg.lm.data and cfg.lm.coef > 0:
        lm = LMChunks(cfg.lm.data, cfg.lm.seq_length, seed=cfg.seed, dp_rank=dp_info()[0])
    cfg.optim.precision = cfg.params_dtype  # bf16 params train with fp32 master weights
    ddp, opt, sched = setup_student(student, cfg.optim, cfg.total_steps)
    source = RolloutSource(ddp, teacher, cfg, tok, train, vocab, lm_chunks=lm)
    step = PPOStep(ddp, teacher, cfg, vocab, lm_chunks=lm)
    evaluator = (lambda: evaluate(ddp, teacher, evald, tok, cfg.eval, vocab)) if evald is not None else None
    trainer, last = fit(ddp, opt, sched, s_cfg, step=step, run=cfg, cfg=cfg, name="minillm", batch_size=cfg.ppo.batch_size,
                         total_steps=cfg.total_steps, make_iterator=lambda consumed: iter(source),
                         tokenizer=tok.path or None, seed=cfg.seed, evaluator=evaluator,
                         rank_state=source.state, load_rank_state=source.load_state)
    if is_main_process():
        print(f"minillm: {trainer.iteration} steps done; last evaluation {last.get('valid')}", flush=True)
    return last.get("valid") or {}


def run_sft(cfg: SFTRunConfig) -> dict:
    """SFT / word-level KD from a checkpoint or a model preset; returns the last validation metrics."""
    from megatron_kd.posttrain.sft import InstructionBatches, SFTStep
    from megatron_kd.posttrain.steps import fit, setup_student

    plan = prepare_sft(cfg)
    init_distributed(cfg.parallel)
    set_seed(cfg.sft.seed)
    if cfg.student:
        student = _load_student(cfg.student, cfg.params_dtype, plan)
    else:
        from megatron_kd.models import build_gpt_model

        student = build_gpt_model(plan.model, params_dtype=cfg.params_dtype)
    teacher = _load_teacher(cfg, plan) if plan.teacher is not None else None
    tok, vocab, s_cfg = plan.tokenizer, plan.vocab_size, plan.model
    batches = InstructionBatches(plan.datasets["train_data"], cfg.sft, tok.pad)
    valid = (InstructionBatches(plan.datasets["valid_data"], cfg.sft, tok.pad, training=False)
             if "valid_data" in plan.datasets else None)
    cfg.sft.optim.precision = cfg.params_dtype
    ddp, opt, sched = setup_student(student, cfg.sft.optim, batches.total_steps)
    step = SFTStep(ddp, cfg.sft, vocab, teacher=teacher)
    evaluator = (lambda: step.validation_loss(valid)) if valid is not None else None
    trainer, last = fit(ddp, opt, sched, s_cfg, step=step, run=cfg, cfg=cfg, name="sft", batch_size=cfg.sft.batch_size,
                         total_steps=batches.total_steps, make_iterator=lambda consumed: batches.iterator(
                             consumed // cfg.sft.batch_size), tokenizer=tok.path or None, seed=cfg.sft.seed,
                         evaluator=evaluator)
    if is_main_process():
        print(f"sft: {trainer.iteration} steps; last validation {last.get('valid')}", flush=True)
    return last.get("valid") or {}


def run_generate(checkpoint: str, input_jsonl: str, output_jsonl: str, tokenizer: str | None, gen, template,
                 parallel: ParallelConfig, batch_size: int, max_prompt_length: int, limit: int | None,
                 params_dtype: str = "fp32") -> dict:
    """SeqKD data: answer every prompt of ``input_jsonl`` with the checkpoint's model."""
    from megatron_kd.posttrain.seqkd import generate_jsonl
    from megatron_kd.training.checkpoint import load_model_for_inference

    if not Path(input_jsonl).is_file():
        raise FileNotFoundError(f"--input {input_jsonl} does not exist: pass an instruction JSONL file")
    if Path(output_jsonl).exists():
        raise FileExistsError(f"--output {output_jsonl} already exists: remove it or choose another path")
    init_distributed(parallel)
    model, cfg, meta = load_model_for_inference(checkpoint, params_dtype)
    tok = load_any_tokenizer(checkpoint_tokenizer(checkpoint, meta, tokenizer))
    vocab = min(cfg.vocab_size, tok.vocab_size)
    gen.eos_id, gen.pad_id = tok.eod, tok.pad
    bar = progress(None, "generate", unit="prompt")
    out = generate_jsonl(model, input_jsonl, output_jsonl, tok, gen, vocab, template, max_prompt_length,
                         batch_size, limit, progress=bar)
    bar.close()
    if is_main_process():
        print(f"generate: wrote {out['records']} records to {output_jsonl} "
              f"(mean {out['mean_response_tokens']:.1f} response tokens)", flush=True)
    return out


def run_onpolicy(cfg: OnPolicyRunConfig) -> dict:
    """GKD / DistiLLM from checkpoints; returns the last evaluation."""
    from megatron_kd.posttrain.evaluate import evaluate
    from megatron_kd.posttrain.onpolicy import DivergenceStep, ResponseSource
    from megatron_kd.posttrain.steps import fit, setup_student

    plan = prepare_onpolicy(cfg)
    init_distributed(cfg.parallel)
    set_seed(cfg.onpolicy.seed)
    student, teacher = _load_student(cfg.student, cfg.params_dtype, plan), _load_teacher(cfg, plan)
    tok, vocab, s_cfg = plan.tokenizer, plan.vocab_size, plan.model
    train, valid, evald = (plan.datasets.get(k) for k in ("train_data", "valid_data", "eval_data"))
    cfg.onpolicy.optim.precision = cfg.params_dtype
    ddp, opt, sched = setup_student(student, cfg.onpolicy.optim, cfg.onpolicy.total_steps)
    source = ResponseSource(ddp, teacher, cfg.onpolicy, train, tok, vocab)
    step = DivergenceStep(ddp, teacher, cfg.onpolicy, tok.pad, tok.eod, vocab)

    def evaluator() -> dict[str, float]:
        out: dict[str, float] = {}
        if valid is not None:
            out["valid_loss"] = step.validation_loss(valid)
            source.update_threshold(out["valid_loss"])
            out["threshold"] = source.threshold
        if evald is not None:
            out.update(evaluate(ddp, teacher, evald, tok, cfg.eval, vocab))
        return out

    has_eval = valid is not None or evald is not None
    trainer, last = fit(ddp, opt, sched, s_cfg, step=step, run=cfg, cfg=cfg, name=cfg.onpolicy.method,
                         batch_size=cfg.onpolicy.batch_size, total_steps=cfg.onpolicy.total_steps,
                         make_iterator=lambda consumed: source.iterator(consumed // cfg.onpolicy.batch_size),
                         tokenizer=tok.path or None, seed=cfg.onpolicy.seed,
                         evaluator=evaluator if has_eval else None, extra_state=source.extra_state,
                         load_extra_state=source.load_extra_state, rank_state=source.rank_state,
                         load_rank_state=source.load_rank_state)
    if is_main_process():
        print(f"{cfg.onpolicy.method}: {trainer.iteration} steps; sources {source.source_counts}; "
              f"last {last.get('valid')}", flush=True)
    return last.get("valid") or {}
