"""The training loop on megatron-core schedules, with a pluggable forward step.

:class:`Trainer` knows nothing about the loss: it runs ``get_forward_backward_func`` (no
pipelining, or 1F1B when PP > 1) with the given ``forward_step_func`` (see
:mod:`megatron_kd.training.lm_loss` for the contract), steps the optimizer and the LR schedule,
logs every reported metric, evaluates, checkpoints and resumes. Distillation plugs in its own
forward step, ``adjust_tensor_shapes_fn`` (teacher activations through the pipeline), an
``on_step_end`` hook and ``extra_state``/``load_extra_state`` (its schedule state in checkpoints).

Algorithms whose iteration is not one megatron schedule pass (post-training: PPO on rollouts,
GKD on generated responses) plug in a :class:`TrainStep` instead of a forward step: it runs the
forward/backward passes of one iteration on the batch its batch source yields and returns the
step's metrics; the Trainer still owns zeroing, the LR schedule, the non-finite check, the
optimizer step, evaluation (an ``evaluator`` callable), checkpoints (``rank_state`` /
``load_rank_state``: per-rank state such as a rollout or replay buffer) and metrics.
"""
from __future__ import annotations

import inspect
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_kd.models.config import ModelConfig
from megatron_kd.models.moe import router_loss_metrics
from megatron_kd.runtime.distributed import device, is_main_process
from megatron_kd.utils.threads import ThreadLease
from megatron_kd.training.checkpoint import has_checkpoint, load_checkpoint, load_rank_state, save_checkpoint
from megatron_kd.training.config import CheckpointConfig, LoggingConfig, TrainConfig
from megatron_kd.training.metrics import (MetricsLogger, check_metrics_owner, claim_metrics_path,
                                          default_metrics_path, main_loss, reduce_reports)
from megatron_kd.training.optim import current_lr
from megatron_kd.utils.exits import NonFiniteError, RunInterrupted
from megatron_kd.utils.processes import StopSignals, children_die_with_parent
from megatron_kd.utils.progress import read_jsonl

ForwardStep = Callable[[Iterator, torch.nn.Module], tuple[torch.Tensor, Callable]]


class TrainStep(Protocol):
    """The work of one iteration for algorithms that are not one schedule pass (see the module docstring).

    ``step(batch)`` receives the next item of the train iterator, runs forward and backward into the
    model's (zeroed) gradient buffers, reduces them over data parallel (``finalize_model_grads``),
    and returns the step's metrics (the first of ``total``/``lm``/the first key is the loss). The
    Trainer then checks finiteness, steps the LR schedule and the optimizer.
    """

    def __call__(self, batch: Any) -> dict[str, float]: ...


def data_parallel_size() -> int:
    """Data-parallel world size of the initialised parallel_state."""
    return parallel_state.get_data_parallel_world_size()


def num_microbatches(train: TrainConfig) -> int:
    """Micro-batches per optimizer step on each DP rank (gradient accumulation steps)."""
    return train.global_batch_size // (train.micro_batch_size * data_parallel_size())


def resume_dir(ckpt: CheckpointConfig | None) -> tuple[Path | None, bool]:
    """``(directory, full)`` a run starts from: ``save`` if it holds a checkpoint (an interrupted run
    resumes fully), else ``load`` (fully, or weights only when ``finetune``), else ``(None, False)``."""
    if ckpt is None:
        return None, False
    if ckpt.save and has_checkpoint(ckpt.save):
        return Path(ckpt.save), True
    if ckpt.load:
        if not has_checkpoint(ckpt.load):
            raise FileNotFoundError(f"checkpoint.load={ckpt.load} holds no checkpoint (no 'latest' file; a Hugging "
                                    "Face model directory needs megatron_kd.interop imported, as the CLI does)")
        return Path(ckpt.load), not ckpt.finetune
    return None, False


def _call_step_hook(hook: Callable, step: int, metrics: dict[str, Any]) -> None:
    """``hook(step, metrics)``, or ``hook(step)`` for a hook that takes one argument."""
    try:
        params = inspect.signature(hook).parameters.values()
    except (TypeError, ValueError):
        params = []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) == 1 and not any(p.kind == p.VAR_POSITIONAL for p in params):
        hook(step)
    else:
        hook(step, metrics)


def _ddp_grad_buffers(chunk: Any) -> list:
    """megatron DDP's gradient buffers of ``chunk`` (or of the DDP under its ``.module`` chain, e.g. a
    distillation wrapper); ``nn.Module.buffers`` (a method) is not what is meant."""
    module = chunk
    while module is not None:
        found = getattr(module, "buffers", None)
        if isinstance(found, (list, tuple)):
            return list(found) + list(getattr(module, "expert_parallel_buffers", None) or [])
        module = getattr(module, "module", None)
    return []


class Trainer:
    """Runs optimizer steps over megatron-core model chunks (see the module docstring).

    ``model_chunks``/``optimizer``/``scheduler`` come from
    :func:`megatron_kd.training.model_setup.setup_model_and_optimizer`.
    """

    def __init__(self, model_chunks: list[torch.nn.Module], optimizer, scheduler, forward_step_func: ForwardStep,
                 model_config: ModelConfig, train: TrainConfig, checkpoint: CheckpointConfig | None = None,
                 logging: LoggingConfig | None = None, *, valid_forward_step_func: ForwardStep | None = None,
                 adjust_tensor_shapes_fn: Callable | None = None,
                 on_step_end: Callable[..., None] | None = None,
                 extra_state: Callable[[], dict[str, Any]] | None = None,
                 load_extra_state: Callable[[dict[str, Any]], None] | None = None,
                 tokenizer: str | None = None, desc: str = "train", step: TrainStep | None = None,
                 evaluator: Callable[[], dict[str, float]] | None = None,
                 rank_state: Callable[[], dict[str, Any]] | None = None,
                 load_rank_state: Callable[[dict[str, Any]], None] | None = None,
                 config_to_save: Any = None):
        self.model_chunks, self.optimizer, self.scheduler = model_chunks, optimizer, scheduler
        self.forward_step_func = forward_step_func
        self.valid_forward_step_func = valid_forward_step_func or forward_step_func
        self.model_config, self.train_cfg = model_config, train
        self.ckpt_cfg = checkpoint or CheckpointConfig()
        self.log_cfg = logging or LoggingConfig()
        self.adjust_tensor_shapes_fn = adjust_tensor_shapes_fn
        self.on_step_end, self.extra_state, self.load_extra_state = on_step_end, extra_state, load_extra_state
        self.tokenizer, self.desc = tokenizer, desc
        self.step_fn, self.evaluator = step, evaluator
        self.rank_state, self.load_rank_state = rank_state, load_rank_state
        self.config_to_save = config_to_save
        self.iteration = 0
        self.consumed_samples = 0
        self.num_microbatches = num_microbatches(train)
        self._stop_requested = False
        self._signals: StopSignals | None = None
        self._fit_start = time.perf_counter()
        self._saved_iteration: int | None = None  # iteration of the checkpoint in checkpoint.save, if any
        self.nonfinite_skips = 0  # updates dropped by train.nonfinite=skip over the whole run
        self._nonfinite_streak = 0

    # ----------------------------------------------------------------------------- checkpoints
    def resume(self) -> bool:
        """Load the newest checkpoint of ``checkpoint.save`` (or else ``checkpoint.load``) if any.

        Restores model, optimizer, LR schedule step, RNG, iteration, consumed samples and the
        ``load_extra_state`` hook's state. With ``checkpoint.finetune`` only the weights are loaded
        and the run starts at iteration 0. Returns True when something was loaded.
        """
        source, full = resume_dir(self.ckpt_cfg)
        if source is None:
            return False
        if not full:
            load_checkpoint(source, self.model_chunks, load_rng=False)
            # Mixed precision keeps fp32 master copies of the weights: refresh them from the model.
            self.optimizer.reload_model_params()
            self._print(f"loaded weights from {source} (finetune: fresh optimizer, iteration 0)")
            return True
        meta = load_checkpoint(source, self.model_chunks, self.optimizer, self.scheduler)
        self.iteration = int(meta["iteration"])
        extra = meta.get("extra") or {}
        self.consumed_samples = int(extra.get("consumed_samples", self.iteration * self.train_cfg.global_batch_size))
        self.nonfinite_skips = int(extra.get("nonfinite_skips", 0))
        if self.ckpt_cfg.save and Path(source).resolve() == Path(self.ckpt_cfg.save).resolve():
            self._saved_iteration = self.iteration
        if self.load_extra_state is not None:
            self.load_extra_state(extra.get("hooks") or {})
        if self.load_rank_state is not None:
            self.load_rank_state(load_rank_state(meta["path"]) or {})
        self._print(f"resumed from {meta['path']} at iteration {self.iteration} "
                    f"({self.consumed_samples} samples consumed)")
        return True

    def save(self) -> Path | None:
        """Checkpoint the current state into ``checkpoint.save`` (collective; no-op without a save dir)."""
        if not self.ckpt_cfg.save:
            return None
        extra = {"consumed_samples": self.consumed_samples, "nonfinite_skips": self.nonfinite_skips,
                 "hooks": self.extra_state() if self.extra_state is not None else {}}
        path = save_checkpoint(self.ckpt_cfg.save, self.model_chunks, self.model_config, self.iteration,
                               optimizer=self.optimizer, scheduler=self.scheduler, extra=extra,
                               tokenizer=self.ckpt_cfg.tokenizer or self.tokenizer,
                               keep_last=self.ckpt_cfg.keep_last or None,
                               seq_length=self.train_cfg.seq_length,
                               rank_state=self.rank_state() if self.rank_state is not None else None)
        if self.config_to_save is not None and is_main_process():  # the run's resolved config, atomically
            import yaml

            from megatron_kd.config import to_dict
            from megatron_kd.utils.io import atomic_write

            with atomic_write(Path(self.ckpt_cfg.save) / "config.yaml", "w", encoding="utf-8") as fh:
                fh.write(yaml.safe_dump(to_dict(self.config_to_save), sort_keys=False))
        self._saved_iteration = self.iteration
        self._print(f"saved checkpoint {path}")
        return path

    # ----------------------------------------------------------------------------- steps
    def _schedule(self, data_iterator, forward_step_func, forward_only: bool):
        data = data_iterator if len(self.model_chunks) == 1 else [data_iterator] * len(self.model_chunks)
        kwargs = dict(
            forward_step_func=forward_step_func, data_iterator=data, model=self.model_chunks,
            num_microbatches=self.num_microbatches, seq_length=self.train_cfg.seq_length,
            micro_batch_size=self.train_cfg.micro_batch_size, decoder_seq_length=self.train_cfg.seq_length,
            forward_only=forward_only,
        )
        if self.adjust_tensor_shapes_fn is not None:
            kwargs["adjust_tensor_shapes_fn"] = self.adjust_tensor_shapes_fn
        return get_forward_backward_func()(**kwargs)

    def train_step(self, data_iterator: Iterator) -> dict[str, float]:
        """One optimizer step over ``num_microbatches`` micro-batches; returns the step's metrics."""
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.step_fn is not None:
            metrics = dict(self.step_fn(next(data_iterator)))
        else:
            reports = self._schedule(data_iterator, self.forward_step_func, forward_only=False)
            metrics = reduce_reports(reports)
            metrics.update(router_loss_metrics(self.num_microbatches))  # MoE students with an aux loss; else {}
        # Step k (1-based) uses the schedule's lr(k): warmup reaches the peak at step W exactly.
        self.scheduler.step(1)
        lr = current_lr(self.optimizer)
        loss = main_loss(metrics)
        finite = math.isfinite(loss) and self._grads_finite()
        ok, grad_norm = False, None
        if finite:  # a non-finite update is never applied (train.nonfinite decides what happens next)
            ok, grad_norm, _ = self.optimizer.step()
        self.iteration += 1
        self.consumed_samples += self.train_cfg.global_batch_size
        out = {"loss": loss, **metrics, "lr": lr,
               "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
               "consumed_samples": self.consumed_samples}
        if not finite:
            out["nonfinite_skipped"] = 1
        elif not ok:
            out["skipped"] = 1  # fp16 overflow: megatron skipped the update
        return out

    def _grads_finite(self) -> bool:
        """True when every gradient element on every rank is finite (collective; one pass over the
        DDP gradient buffers). fp16 runs leave overflow to megatron's loss scaler."""
        if getattr(getattr(self.optimizer, "config", None), "fp16", False):
            return True
        local = True
        for chunk in self.model_chunks:
            buffers = _ddp_grad_buffers(chunk)
            grads = [b.grad_data for b in buffers if getattr(b, "grad_data", None) is not None]
            if not grads:
                grads = [g for p in chunk.parameters()
                         if (g := (getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None
                                   else p.grad)) is not None]
            local = local and all(bool(torch.isfinite(g).all()) for g in grads)
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([int(local)], dtype=torch.int32, device=device())
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            local = bool(flag.item())
        return local

    def _handle_nonfinite(self, metrics: dict[str, Any]) -> None:
        """Apply ``train.nonfinite`` after a step whose update was dropped (raises NonFiniteError)."""
        if not metrics.get("nonfinite_skipped"):
            self._nonfinite_streak = 0
            return
        self.nonfinite_skips += 1
        self._nonfinite_streak += 1
        metrics["nonfinite_skips"] = self.nonfinite_skips
        cfg = self.train_cfg
        loss = metrics.get("loss", float("nan"))
        what = f"loss {loss}" if not math.isfinite(loss) else "gradient (NaN/inf elements)"
        if cfg.nonfinite == "skip" and self._nonfinite_streak < cfg.nonfinite_max_consecutive:
            self._print(f"step {self.iteration}: non-finite {what}: update skipped "
                        f"({self._nonfinite_streak}/{cfg.nonfinite_max_consecutive} in a row)")
            return
        if self.iteration == 1 or self.iteration - self._nonfinite_streak == 0:
            cause = "the data or the initialisation (non-finite from the first step)"
        else:
            cause = f"divergence: learning rate too high (lr {metrics.get('lr', float('nan')):.3g} at this step)"
        streak = f"{self._nonfinite_streak} consecutive non-finite steps, " if cfg.nonfinite == "skip" else ""
        saved = (f"last checkpoint: iteration {self._saved_iteration}" if self._saved_iteration is not None
                 else "no checkpoint saved")
        raise NonFiniteError(
            f"non-finite {what} at step {self.iteration} ({streak}train.nonfinite={cfg.nonfinite}); likely cause: "
            f"{cause}; this state was not saved ({saved}); lower optim.lr, set optim.clip_grad, or "
            "train.nonfinite=skip")

    @torch.no_grad()
    def evaluate(self, valid_iterator: Iterator) -> dict[str, float]:
        """Forward-only over ``train.eval_iters`` global batches; token-weighted metrics + ``ppl``."""
        for chunk in self.model_chunks:
            chunk.eval()
        reports: list[dict[str, Any]] = []
        for _ in range(self.train_cfg.eval_iters):
            reports.extend(self._schedule(valid_iterator, self.valid_forward_step_func, forward_only=True))
        for chunk in self.model_chunks:
            chunk.train()
        metrics = reduce_reports(reports)
        loss = main_loss(metrics)
        return {"loss": loss, **metrics, "ppl": math.exp(min(loss, 50.0))}

    # ----------------------------------------------------------------------------- the loop
    def metrics_path(self) -> str | None:
        """The JSONL metrics file: ``logging.metrics_path``, else ``<checkpoint.save>/metrics.jsonl``."""
        path = self.log_cfg.metrics_path or default_metrics_path(self.ckpt_cfg.save)
        return str(path) if path is not None else None

    def fit(self, make_train_iterator: Callable[[int], Iterator],
            make_valid_iterator: Callable[[], Iterator] | None = None) -> dict[str, Any]:
        """Train until ``train.train_iters`` (or ``exit_interval`` / ``exit_duration_mins`` / a signal),
        checkpointing and evaluating.

        ``make_train_iterator(consumed_samples)`` returns this rank's micro-batch iterator starting
        at that global sample; ``make_valid_iterator()`` a fresh validation iterator (each evaluation
        sees the same batches). Returns ``{"iteration", "train": last step metrics, "valid": last eval}``.

        Faults: SIGTERM/SIGINT finish the current step, save, and raise :class:`RunInterrupted`
        (exit code 75); a non-finite step follows ``train.nonfinite`` (:class:`NonFiniteError`,
        exit code 3); a run that had already finished returns at once, changing nothing.
        """
        train_cfg = self.train_cfg
        children_die_with_parent()
        metrics_path = self.metrics_path()
        if self.iteration >= train_cfg.train_iters and self._saved_iteration == self.iteration:
            return self._finished_result(metrics_path)
        check_metrics_owner(metrics_path, self.ckpt_cfg.save)
        claim_metrics_path(metrics_path, self.ckpt_cfg.save)
        self._fit_start = time.perf_counter()
        for chunk in self.model_chunks:
            chunk.train()
        data_iterator = make_train_iterator(self.consumed_samples)
        logger = MetricsLogger(self.log_cfg, metrics_path, train_cfg.train_iters, self.iteration,
                               train_cfg.global_batch_size * train_cfg.seq_length, train_cfg.log_interval, self.desc)
        last: dict[str, Any] = {"iteration": self.iteration, "train": {}, "valid": {}}
        do_eval = self.evaluator is not None or (make_valid_iterator is not None and train_cfg.eval_iters > 0)
        lease = ThreadLease()  # cores a scheduler lends between steps ($MEGATRON_KD_THREAD_LEASE; else none)
        try:
            with StopSignals() as self._signals:
                while self.iteration < train_cfg.train_iters:
                    threads = lease.current
                    if lease.poll() != threads:
                        self._print(f"step {self.iteration + 1}: {lease.current} intra-op threads (thread lease)")
                    t0 = time.perf_counter()
                    step_metrics = self.train_step(data_iterator)
                    self._handle_nonfinite_logged(logger, step_metrics, time.perf_counter() - t0)
                    last["train"] = step_metrics
                    if self.on_step_end is not None:
                        _call_step_hook(self.on_step_end, self.iteration, step_metrics)
                    if do_eval and train_cfg.eval_interval and self.iteration % train_cfg.eval_interval == 0:
                        last["valid"] = self._run_eval(make_valid_iterator)
                        logger.log_eval(self.iteration, last["valid"])
                    interval = self.ckpt_cfg.save_interval
                    if interval and self.iteration % interval == 0:
                        self.save()
                    if self._should_stop():
                        break
                finished = self.iteration >= train_cfg.train_iters
                # An interrupted run skips the final evaluation: its resumed run does it, so the
                # metrics equal those of an uninterrupted run.
                if finished and do_eval and not (train_cfg.eval_interval
                                                 and self.iteration % train_cfg.eval_interval == 0):
                    last["valid"] = self._run_eval(make_valid_iterator)
                    logger.log_eval(self.iteration, last["valid"])
                if self._saved_iteration != self.iteration:
                    self.save()
                signal_name = self._signals.received
        finally:
            self._signals = None
            lease.restore()
            logger.close()
        last["iteration"] = self.iteration
        if signal_name and not finished:
            where = (f"checkpoint {self.ckpt_cfg.save} at iteration {self.iteration} saved; rerun the same command "
                     "to resume" if self.ckpt_cfg.save else "nothing saved (no checkpoint.save)")
            raise RunInterrupted(f"interrupted by {signal_name} after step {self.iteration}/{train_cfg.train_iters}: "
                                 f"{where} (exit code 75 = requeue)")
        return last

    def _run_eval(self, make_valid_iterator: Callable[[], Iterator] | None) -> dict[str, float]:
        """The ``evaluator`` hook if given, else :meth:`evaluate` on a fresh validation iterator."""
        if self.evaluator is not None:
            return self.evaluator()
        return self.evaluate(make_valid_iterator())

    def _handle_nonfinite_logged(self, logger: MetricsLogger, metrics: dict[str, Any], step_time: float) -> None:
        """Count a dropped update, log the step, then apply ``train.nonfinite`` (may raise)."""
        try:
            self._handle_nonfinite(metrics)
        finally:
            logger.log_train(self.iteration, metrics, step_time)

    def _finished_result(self, metrics_path: str | None) -> dict[str, Any]:
        """A rerun of a finished run: say so, touch nothing, return the recorded final metrics."""
        self._print(f"run already finished: checkpoint {self.ckpt_cfg.save} is at iteration {self.iteration} "
                    f"= train.train_iters; nothing to do (raise train.train_iters to train further)")
        last: dict[str, Any] = {"iteration": self.iteration, "train": {}, "valid": {}, "already_finished": True}
        if metrics_path and Path(metrics_path).is_file():
            for record in read_jsonl(metrics_path):
                if record.get("step") == self.iteration and record.get("split") in ("train", "valid"):
                    last[record["split"]] = {k: v for k, v in record.items() if k not in ("step", "split", "time")}
        return last

    def _should_stop(self) -> bool:
        """Agree across ranks on stopping early (exit_interval, exit_duration_mins, or a signal on any rank)."""
        exit_interval, minutes = self.train_cfg.exit_interval, self.train_cfg.exit_duration_mins
        signalled = self._stop_requested or bool(self._signals is not None and self._signals.received)
        local = signalled or bool(exit_interval and self.iteration % exit_interval == 0)
        local = local or bool(minutes and time.perf_counter() - self._fit_start > 60.0 * minutes)
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([int(local), int(signalled)], dtype=torch.int32, device=device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            local = bool(flag[0].item())
            if flag[1].item() and self._signals is not None and not self._signals.received:
                self._signals.received = "SIGTERM"  # another rank was signalled
        if local and self.iteration < self.train_cfg.train_iters:
            self._print(f"stopping early at iteration {self.iteration} (exit_interval, exit_duration_mins "
                        "or a signal)")
        return local

    def _print(self, message: str) -> None:
        if is_main_process():
            tqdm.write(message)  # above the progress bar, not through it


def train(model_chunks: list[torch.nn.Module], optimizer, scheduler, forward_step_func: ForwardStep,
          model_config: ModelConfig, train_cfg: TrainConfig, make_train_iterator: Callable[[int], Iterator],
          make_valid_iterator: Callable[[], Iterator] | None = None, checkpoint: CheckpointConfig | None = None,
          logging: LoggingConfig | None = None, **trainer_kwargs) -> dict[str, Any]:
    """Build a :class:`Trainer`, resume if a checkpoint exists, and run :meth:`Trainer.fit`."""
    trainer = Trainer(model_chunks, optimizer, scheduler, forward_step_func, model_config, train_cfg,
                      checkpoint, logging, **trainer_kwargs)
    trainer.resume()
    return trainer.fit(make_train_iterator, make_valid_iterator)
