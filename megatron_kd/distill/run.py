"""``megatron-kd distill``: validate, build student (+ teacher), data, resume, train with KD.

:func:`run_distill` is the library entry point of the command (and of ``tools/distill_gpt.py``)::

    cfg = load_config(DistillConfig, "examples/cpu/distill_tiny.yaml", ["kd.alpha=0.9"])
    result = run_distill(cfg)          # {"iteration", "train": {...}, "valid": {...}, "config"}

The student side reuses the training package unchanged (``prepare_config``,
``setup_model_and_optimizer``, ``build_data_iterators``, :class:`~megatron_kd.training.Trainer`);
distillation adds the teacher (:mod:`.teacher`), the pipeline wrapper (:mod:`.pipeline`), the
forward steps (:mod:`.forward_step`) and :class:`DistillTrainer` (alpha step + teacher timing).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from megatron.core import parallel_state

from megatron_kd.config import save_config, to_dict
from megatron_kd.distill.config import DistillConfig, validate_kd_settings
from megatron_kd.distill.forward_step import DistillForwardStep, KDState
from megatron_kd.distill.intermediate import IntermediateLosses, attach_projections, resolve_pairs
from megatron_kd.distill.pipeline import DistillationModel, install_schedule_hooks, make_adjust_tensor_shapes_fn
from megatron_kd.distill.teacher import TeacherSpec, inspect_teacher, load_teacher, student_padded_vocab
from megatron_kd.losses import alpha_at
from megatron_kd.models.builder import build_gpt_model
from megatron_kd.models.config import ModelConfig
from megatron_kd.runtime.distributed import destroy_distributed, device, init_distributed, is_main_process, set_seed
from megatron_kd.training.checkpoint import read_checkpoint_meta
from megatron_kd.training.loop import Trainer, resume_dir
from megatron_kd.training.model_setup import setup_model_and_optimizer, unwrap_model
from megatron_kd.training.pretrain import build_data_iterators, prepare_config

IteratorFactories = tuple[Callable[[int], Iterator], Optional[Callable[[], Iterator]]]


class DistillTrainer(Trainer):
    """The training loop plus KD bookkeeping: sets the alpha-schedule step before every optimizer
    step and adds ``teacher_time_s`` / ``student_time_s`` / ``teacher_time_frac`` to the step
    metrics (online; this rank's teacher forwards vs. the rest of the step). With intermediate-layer
    pairs (``intermediate=(num_pairs, weight)``) it reports their mean per-token loss
    (``intermediate``) and adds ``alpha * weight * num_pairs * intermediate`` to ``total``/``loss``:
    the pairs may live on any stage, so only a collective over all ranks sees all of them."""

    def __init__(self, *args: Any, kd_state: KDState, distill_model: DistillationModel | None = None,
                 intermediate: tuple[int, float] | None = None, eval_with_teacher: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.kd_state, self.distill_model = kd_state, distill_model
        self.intermediate = intermediate
        self.eval_with_teacher = eval_with_teacher

    def evaluate(self, valid_iterator: Iterator) -> dict[str, float]:
        """Held-out evaluation; without ``kd.eval_with_teacher`` the teacher sits it out."""
        if self.distill_model is None or self.eval_with_teacher:
            return super().evaluate(valid_iterator)
        self.distill_model.run_teacher = False
        try:
            return super().evaluate(valid_iterator)
        finally:
            self.distill_model.run_teacher = True

    def train_step(self, data_iterator: Iterator) -> dict[str, float]:
        """One optimizer step at alpha(iteration); see :meth:`Trainer.train_step`."""
        self.kd_state.step = self.iteration
        if self.distill_model is not None:
            self.distill_model.timings()  # drop what evaluation accumulated
        t0 = time.perf_counter()
        metrics = super().train_step(data_iterator)
        if self.distill_model is not None:
            elapsed = time.perf_counter() - t0
            teacher, _ = self.distill_model.timings()
            metrics.update(teacher_time_s=round(teacher, 6), student_time_s=round(elapsed - teacher, 6),
                           teacher_time_frac=round(teacher / elapsed, 4) if elapsed > 0 else float("nan"))
        if self.intermediate is not None:
            num_pairs, weight = self.intermediate
            mean = self._intermediate_mean()
            metrics["intermediate"] = mean
            metrics["total"] = metrics["total"] + metrics["alpha"] * weight * num_pairs * mean
            metrics["loss"] = metrics["total"]
        return metrics

    def _intermediate_mean(self) -> float:
        """Mean per-token intermediate loss over all pairs, stages and data-parallel ranks (collective)."""
        inter = self.distill_model.intermediate if self.distill_model is not None else None
        local = inter.take_report() if inter is not None else (0.0, 0.0)
        t = torch.tensor(local, dtype=torch.float64, device=device())
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(t)  # TP replicas count sum and tokens alike: the ratio is unchanged
        return float(t[0] / t[1]) if float(t[1]) > 0 else float("nan")


def prepare_distill_config(cfg: DistillConfig) -> tuple[ModelConfig, TeacherSpec | None]:
    """Validate ``cfg`` for this launch (one-line errors, nothing built).

    Returns the student's ModelConfig and, online, the teacher's :class:`TeacherSpec` (its
    checkpoint meta checked against the student: layout, sequence length, vocabulary).
    """
    validate_kd_settings(cfg)
    if cfg.data.prefixes and not cfg.data.tokenizer and not cfg.data.synthetic:
        # The tokenizer the teacher checkpoint carries (offline: the store's teacher, found relative to the store).
        tok = _teacher_tokenizer(cfg) if cfg.kd.mode == "online" else _store_teacher_tokenizer(cfg)
        cfg.data.tokenizer = tok if tok and Path(tok).exists() else None
    model_cfg = prepare_config(cfg)
    spec = None
    if cfg.kd.mode == "online":
        spec = inspect_teacher(cfg.teacher.load, model_cfg, cfg.parallel.tensor_parallel,
                               cfg.parallel.pipeline_parallel, cfg.train.seq_length, cfg.teacher.iteration,
                               cfg.teacher.tokenizer, cfg.data.tokenizer,
                               cross_tokenizer=cfg.kd.cross_tokenizer is not None)
        resolve_pairs(cfg.kd.intermediate, model_cfg, spec.model_config, cfg.parallel.pipeline_parallel)
    elif cfg.kd.mode == "offline":
        store = _open_store(cfg)
        if cfg.train.seq_length > store.seq_length:
            raise ValueError(f"train.seq_length={cfg.train.seq_length} exceeds the logits store's teacher window "
                             f"{store.seq_length}: train with shorter sequences or recompute the store")
        if cfg.kd.cross_tokenizer is not None:  # the store's byte key and the same source text
            from megatron_kd.distill.cross_tokenizer import check_offline_cross_tokenizer

            check_offline_cross_tokenizer(cfg.kd.logits_store, cfg.data.prefixes[0], cfg.data.tokenizer,
                                          cfg.teacher.tokenizer, model_cfg)
        else:
            store.check_compatible(cfg.data.prefixes[0])  # computed on this very dataset (tokenizer: at data build)
        cfg.kd.target_kind = store.check_kind(cfg.kd.target_kind)  # auto -> the store's kind
        if cfg.kd.target_kind == "weights" and (cfg.kd.temperature != 1.0 or cfg.kd.residual):
            raise ValueError(f"logits store {cfg.kd.logits_store} holds sampled (weighted) targets, which need "
                             f"kd.temperature=1 and kd.residual=false (got {cfg.kd.temperature}, {cfg.kd.residual})")
    return model_cfg, spec


def kd_vocab_size(model_cfg: ModelConfig, spec: TeacherSpec | None) -> int:
    """Real vocabulary the losses run over (columns beyond are masked on both sides)."""
    return int(spec.vocab.kd_vocab_size) if spec is not None else model_cfg.vocab_size


def _teacher_tokenizer(cfg: DistillConfig) -> str | None:
    """teacher.tokenizer, else the tokenizer the teacher checkpoint records."""
    if cfg.teacher.tokenizer:
        return cfg.teacher.tokenizer
    from megatron_kd.interop.convert import checkpoint_tokenizer

    return checkpoint_tokenizer(cfg.teacher.load)


def _store_teacher_tokenizer(cfg: DistillConfig) -> str | None:
    """kd.mode=offline: the tokenizer of the teacher that wrote the logits store (its checkpoint is
    found relative to the store first, so store + checkpoint copied together still resolve)."""
    if cfg.kd.mode != "offline" or not cfg.kd.logits_store:
        return None
    from megatron_kd.interop.convert import checkpoint_tokenizer
    from megatron_kd.training.checkpoint import has_checkpoint
    from megatron_kd.utils.artifacts import resolve_ref
    from megatron_kd.utils.io import read_json

    man_path = Path(cfg.kd.logits_store) / "manifest.json"
    if not man_path.is_file():
        return None
    teacher = read_json(man_path, "logits store manifest").get("teacher") or {}
    for ref in (resolve_ref(teacher.get("checkpoint_relative"), cfg.kd.logits_store), teacher.get("checkpoint")):
        if ref and has_checkpoint(ref):
            try:
                return checkpoint_tokenizer(ref)
            except (OSError, ValueError):
                continue
    return None


def _open_store(cfg: DistillConfig):
    try:
        from megatron_kd.logits import LogitsStore
    except ImportError:
        raise ValueError("kd.mode=offline needs the teacher-logits store package (megatron_kd.logits.LogitsStore), "
                         "which this installation lacks") from None
    store = LogitsStore(cfg.kd.logits_store)
    store.check_integrity()  # shards that `logits --verify` rejects are refused (hashes cached per file)
    return store


def build_distill_data_iterators(cfg: DistillConfig, model_cfg: ModelConfig) -> IteratorFactories:
    """``(make_train_iterator(consumed), make_valid_iterator())`` for this DP rank.

    online / none: the pretrain iterators. offline: the training dataset is wrapped so that every
    sample carries the store's ``target_ids``/``target_logprobs`` aligned with its labels
    (``TeacherTargetsDataset``, which refuses a store of other data or another tokenizer); the
    validation split stays plain (held-out LM loss).
    """
    if cfg.kd.mode == "online" and cfg.kd.cross_tokenizer is not None:
        from megatron_kd.distill.cross_tokenizer import build_cross_tokenizer_iterators

        return build_cross_tokenizer_iterators(cfg, model_cfg, _teacher_tokenizer(cfg))
    if cfg.kd.mode != "offline":
        return build_data_iterators(cfg, model_cfg)
    from megatron_kd.data.gpt_dataset import ResumableBatchIterator, build_gpt_datasets
    from megatron_kd.logits import TeacherTargetsDataset
    from megatron_kd.training.pretrain import _data_config, _load_tokenizer

    train = cfg.train
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    evals = (train.train_iters // train.eval_interval if train.eval_interval else 0) + 1
    train_ds, valid_ds, _ = build_gpt_datasets(
        _data_config(cfg), _load_tokenizer(cfg.data.tokenizer), train.train_iters * train.global_batch_size,
        evals * train.eval_iters * train.global_batch_size, 0)
    if cfg.kd.cross_tokenizer is not None:  # a student of another tokenizer: targets through the byte key
        from megatron_kd.logits.byte_key import ByteKeyedTargetsDataset

        targets = ByteKeyedTargetsDataset(train_ds, _open_store(cfg), cfg.data.tokenizer, k_max=cfg.kd.logits_top_k,
                                          rule=cfg.kd.alignment)
    else:
        targets = TeacherTargetsDataset(train_ds, _open_store(cfg), k_max=cfg.kd.logits_top_k, check=True,
                                        tokenizer=_load_tokenizer(cfg.data.tokenizer))

    def make_train(consumed: int) -> Iterator:
        return ResumableBatchIterator(targets, train.micro_batch_size, dp_rank, dp_size, consumed_samples=consumed,
                                      vocab_size=model_cfg.vocab_size, prefixes=list(cfg.data.prefixes))

    def make_valid() -> Iterator:
        return ResumableBatchIterator(valid_ds, train.micro_batch_size, dp_rank, dp_size, consumed_samples=0,
                                      vocab_size=model_cfg.vocab_size, prefixes=list(cfg.data.prefixes))

    return make_train, (make_valid if valid_ds is not None and train.eval_iters > 0 else None)


def build_distill_trainer(cfg: DistillConfig, model_cfg: ModelConfig, spec: TeacherSpec | None) -> DistillTrainer:
    """Student (+ optimizer, scheduler), frozen teacher and wrapper, forward steps, trainer.

    Requires :func:`init_distributed` and seeding. Does not resume (call ``trainer.resume()``).
    """
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    source, _ = resume_dir(cfg.checkpoint)
    resume_padded = read_checkpoint_meta(source)["padded_vocab_size"] if source is not None else None
    xtok = spec is not None and cfg.kd.cross_tokenizer is not None
    # Cross-tokenizer: the student keeps its own vocabulary (no shard of it lines up with the teacher's).
    padded = student_padded_vocab(spec, model_cfg, tp, resume_padded) if spec is not None and not xtok else resume_padded
    state = KDState(0, cfg.train.train_iters)
    pairs, builder = [], None
    if spec is not None and cfg.kd.intermediate:
        stage = parallel_state.get_pipeline_model_parallel_rank()
        pairs = [p for p in resolve_pairs(cfg.kd.intermediate, model_cfg, spec.model_config, pp) if p.stage == stage]
        h_s, h_t = model_cfg.hidden_size, spec.model_config.hidden_size

        def builder(mcfg: ModelConfig, **kwargs: Any) -> torch.nn.Module:
            model = build_gpt_model(mcfg, **kwargs)
            attach_projections(model, pairs, h_s, h_t, cfg.train.seed)
            return model

    chunks, optimizer, scheduler = setup_model_and_optimizer(model_cfg, cfg.parallel, cfg.optim, cfg.train.train_iters,
                                                             padded_vocab_size=padded, model_builder=builder)
    distill_model, adjust = None, None
    if spec is not None:
        teacher = load_teacher(spec, cfg.teacher.dtype or cfg.optim.precision)
        inter = IntermediateLosses(unwrap_model(chunks[0]), teacher, pairs, cfg.kd, state) if pairs else None
        distill_model = DistillationModel(chunks[0], teacher, model_cfg.hidden_size, spec.model_config.hidden_size,
                                          intermediate=inter)
        install_schedule_hooks(distill_model)
        chunks = [distill_model]
        if pp > 1:
            adjust = make_adjust_tensor_shapes_fn(spec.model_config.hidden_size)
    vocab = kd_vocab_size(model_cfg, spec)
    xtok_offline = spec is None and cfg.kd.mode == "offline" and cfg.kd.cross_tokenizer is not None
    if xtok or xtok_offline:
        from megatron_kd.distill.cross_tokenizer import CrossTokenizerForwardStep, build_plan_vocab_map, offline_plan

        plan = offline_plan(cfg.kd.logits_store, cfg.data.tokenizer, cfg.teacher.tokenizer) if xtok_offline \
            else spec.vocab
        vmap = build_plan_vocab_map(plan, cfg.kd.cross_tokenizer)
        step = CrossTokenizerForwardStep(cfg.kd, plan, vmap, state, offline=xtok_offline)
        valid_step = CrossTokenizerForwardStep(cfg.kd, plan, vmap, state, evaluation=True, offline=xtok_offline,
                                               with_teacher=cfg.kd.eval_with_teacher)
    else:
        step = DistillForwardStep(cfg.kd.mode, cfg.kd, vocab, state)
        # without the teacher, online evaluation is the student's plain LM evaluation (mode none)
        eval_mode = cfg.kd.mode if cfg.kd.eval_with_teacher or cfg.kd.mode != "online" else "none"
        valid_step = DistillForwardStep(eval_mode, cfg.kd, vocab, state, evaluation=True)

    def extra_state() -> dict[str, Any]:
        # alpha is a function of the iteration, which the checkpoint restores: recorded for reference.
        return {"kd_mode": cfg.kd.mode, "kd_step": trainer.iteration,
                "kd_alpha": alpha_at(cfg.kd, trainer.iteration, cfg.train.train_iters)}

    trainer = DistillTrainer(chunks, optimizer, scheduler, step, model_cfg, cfg.train, cfg.checkpoint, cfg.logging,
                             valid_forward_step_func=valid_step, adjust_tensor_shapes_fn=adjust,
                             extra_state=extra_state, tokenizer=cfg.data.tokenizer, desc=f"distill[{cfg.kd.mode}]",
                             kd_state=state, distill_model=distill_model, eval_with_teacher=cfg.kd.eval_with_teacher,
                             intermediate=((len(cfg.kd.intermediate), cfg.kd.intermediate_weight)
                                           if spec is not None and cfg.kd.intermediate else None))
    return trainer


def run_distill(cfg: DistillConfig, data: IteratorFactories | None = None) -> dict[str, Any]:
    """Run (or resume) distillation; returns the final metrics (see :meth:`Trainer.fit`).

    ``data`` replaces the data iterators built from ``cfg.data`` (tests, custom pipelines): a pair
    ``(make_train_iterator(consumed_samples), make_valid_iterator or None)``; offline batches must
    then carry ``target_ids``/``target_logprobs``.
    """
    model_cfg, spec = prepare_distill_config(cfg)
    init_distributed(cfg.parallel)
    try:
        set_seed(cfg.train.seed)
        trainer = build_distill_trainer(cfg, model_cfg, spec)
        make_train, make_valid = data if data is not None else build_distill_data_iterators(cfg, model_cfg)
        if cfg.checkpoint.save and is_main_process():
            Path(cfg.checkpoint.save).mkdir(parents=True, exist_ok=True)
            save_config(cfg, Path(cfg.checkpoint.save) / "distill_config.yaml")
        if is_main_process():
            teacher = (f"teacher {spec.path} ({spec.model_config.num_parameters() / 1e6:.2f}M, "
                       f"{cfg.teacher.dtype or cfg.optim.precision})" if spec else "no teacher")
            print(f"distill[{cfg.kd.mode}]: student {model_cfg.num_parameters() / 1e6:.2f}M parameters, {teacher}, "
                  f"TP {cfg.parallel.tensor_parallel} PP {cfg.parallel.pipeline_parallel}, kd.kind={cfg.kd.kind} "
                  f"T={cfg.kd.temperature} alpha={cfg.kd.alpha} ({cfg.kd.alpha_schedule})"
                  + (f", cross_tokenizer={cfg.kd.cross_tokenizer}" if spec and cfg.kd.cross_tokenizer else ""),
                  flush=True)
        trainer.resume()
        result = trainer.fit(make_train, make_valid)
        result["config"] = to_dict(cfg)
        return result
    finally:
        destroy_distributed()
