"""Online distillation across tokenizers (``kd.cross_tokenizer: uld | hybrid``).

The student reads its indexed dataset as usual. Every sample is re-tokenised for the teacher on
the fly (:class:`CrossTokenizerDataset`): the window's text is rebuilt from the student ids'
bytes, encoded with ``teacher.tokenizer``, cut/padded to the same sequence length, and each
student position gets the teacher position that predicts the same continuation of the text
(:func:`megatron_kd.data.alignment.align_window`; -1 = unaligned). Batches carry
``teacher_tokens``, ``teacher_position_ids`` and ``xtok_index`` next to the student's fields.

:class:`DistillationModel` runs the teacher on ``teacher_tokens`` (``teacher_inputs`` hook) in
the same TP/PP job: the teacher sequence has the student's length, so the pipeline's
concatenated activation ``[s, b, h_s + h_t]`` works unchanged (PP supported). The loss
(:class:`CrossTokenizerForwardStep`) gathers the aligned teacher rows and computes, per student
token, ``(1 - α)·CE + α·[T²]·KD`` with KD = :func:`~megatron_kd.losses.uld_loss` or
:func:`~megatron_kd.losses.hybrid_kd_loss` on aligned positions (0 elsewhere). The report adds
``xtok_aligned`` = ``[aligned, tokens]``; ``kd`` is the mean over aligned positions.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Optional

import numpy as np
import torch

from megatron_kd.data.alignment import align_window, token_bytes
from megatron_kd.distill.config import CROSS_TOKENIZER_LOSSES
from megatron_kd.losses import alpha_at, hybrid_kd_loss, lm_per_token, projected_kd_loss, uld_loss
from megatron_kd.models.builder import mask_padded_vocab
from megatron_kd.training.lm_loss import batch_to_device



@dataclass(frozen=True)
class CrossTokenizerPlan:
    """How a teacher and a student with different tokenizers are compared."""

    student_vocab_size: int
    """Student tokenizer ids (student logits beyond are masked)."""
    teacher_vocab_size: int
    """Teacher tokenizer ids (teacher logits beyond are masked)."""
    student_tokenizer: str
    """Student tokenizer path (data.tokenizer)."""
    teacher_tokenizer: str
    """Teacher tokenizer path (teacher.tokenizer or the one its checkpoint records)."""

    @property
    def kd_vocab_size(self) -> int:
        """The student's real vocabulary (what ``run.kd_vocab_size`` masks the student logits at)."""
        return self.student_vocab_size


def check_cross_tokenizer(teacher_cfg: Any, student_cfg: Any, teacher_tokenizer: Optional[str],
                          student_tokenizer: Optional[str]) -> CrossTokenizerPlan:
    """Both tokenizers known, lossless (byte spans), and each model covering its own tokenizer."""
    from megatron_kd.data.tokenizers import load_tokenizer

    if not teacher_tokenizer:
        raise ValueError("kd.cross_tokenizer needs the teacher's tokenizer: set teacher.tokenizer=<path> (the "
                         "teacher checkpoint records none)")
    if not student_tokenizer:
        raise ValueError("kd.cross_tokenizer needs data.tokenizer (the student's tokenizer) and indexed data")
    sizes = {}
    for side, path, cfg in (("teacher", teacher_tokenizer, teacher_cfg), ("student", student_tokenizer, student_cfg)):
        tok = load_tokenizer(path)
        if token_bytes(tok) is None and getattr(tok, "_fast", None) is None:
            raise ValueError(f"{side} tokenizer {path} gives no byte spans: cross-tokenizer KD needs a "
                             "SentencePiece or Hugging Face fast tokenizer")
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"{side} vocab_size={cfg.vocab_size} is smaller than its tokenizer's {tok.vocab_size} "
                             f"ids ({path}): was the {side} built for another tokenizer?")
        sizes[side] = int(tok.vocab_size)
    return CrossTokenizerPlan(sizes["student"], sizes["teacher"], str(student_tokenizer), str(teacher_tokenizer))


def build_plan_vocab_map(plan: CrossTokenizerPlan, loss: str = "hybrid"):
    """What the loss needs from the plan's two tokenizers: the matched ids
    (:class:`~megatron_kd.data.vocab_map.VocabMap`, ``hybrid``) or the teacher -> student
    projection (``projected``); None for ``uld``."""
    from megatron_kd.data.tokenizers import load_tokenizer
    from megatron_kd.data.vocab_map import build_projection, build_vocab_map

    if loss == "uld":
        return None
    student, teacher = load_tokenizer(plan.student_tokenizer), load_tokenizer(plan.teacher_tokenizer)
    return build_vocab_map(student, teacher) if loss == "hybrid" else build_projection(student, teacher)


class CrossTokenizerDataset(torch.utils.data.Dataset):
    """A GPT dataset whose samples also carry the teacher's tokenisation and the alignment.

    Adds ``teacher_tokens`` / ``teacher_position_ids`` (int64 [s]) and ``xtok_index`` (int64 [s],
    the teacher position aligned with each student input position, -1 = none) to every sample.
    """

    def __init__(self, base: Any, student_tokenizer: Any, teacher_tokenizer: Any, rule: str = "exact"):
        from megatron_kd.data.tokenizers import load_tokenizer

        self.base, self.rule = base, rule
        self.student_tokenizer = load_tokenizer(student_tokenizer)
        self.teacher_tokenizer = load_tokenizer(teacher_tokenizer)
        self.table = token_bytes(self.student_tokenizer)
        if self.table is None:
            raise ValueError(f"student tokenizer {self.student_tokenizer.path} has no byte table: cross-tokenizer "
                             "KD rebuilds the text from the student ids (SentencePiece or byte-level BPE needed)")

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        sample = dict(self.base[idx])
        tokens = np.asarray(sample["tokens"], dtype=np.int64)
        labels = np.asarray(sample["labels"], dtype=np.int64)
        window = np.concatenate([tokens, labels[-1:]])
        n = len(tokens)
        w = align_window(window, self.table, self.teacher_tokenizer, n, self.rule, input_length=n)
        sample["teacher_tokens"] = torch.from_numpy(w.teacher_tokens)
        sample["teacher_position_ids"] = torch.arange(n, dtype=torch.int64)
        sample["xtok_index"] = torch.from_numpy(w.teacher_index)
        return sample


def build_cross_tokenizer_iterators(cfg: Any, model_cfg: Any, teacher_tokenizer: str):
    """``(make_train_iterator(consumed), make_valid_iterator())`` over indexed data, both splits
    wrapped in :class:`CrossTokenizerDataset` (the teacher also runs in evaluation)."""
    from megatron.core import parallel_state

    from megatron_kd.data.gpt_dataset import ResumableBatchIterator, build_gpt_datasets
    from megatron_kd.training.pretrain import _data_config, _load_tokenizer

    train = cfg.train
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    evals = (train.train_iters // train.eval_interval if train.eval_interval else 0) + 1
    student_tok = _load_tokenizer(cfg.data.tokenizer)
    train_ds, valid_ds, _ = build_gpt_datasets(
        _data_config(cfg), student_tok, train.train_iters * train.global_batch_size,
        evals * train.eval_iters * train.global_batch_size, 0)
    rule = cfg.kd.alignment
    train_x = CrossTokenizerDataset(train_ds, student_tok, teacher_tokenizer, rule)
    valid_x = CrossTokenizerDataset(valid_ds, student_tok, teacher_tokenizer, rule) if valid_ds is not None else None

    def make_train(consumed: int) -> Iterator:
        return ResumableBatchIterator(train_x, train.micro_batch_size, dp_rank, dp_size, consumed_samples=consumed)

    def make_valid() -> Iterator:
        return ResumableBatchIterator(valid_x, train.micro_batch_size, dp_rank, dp_size, consumed_samples=0)

    return make_train, (make_valid if valid_x is not None and train.eval_iters > 0 else None)


def check_offline_cross_tokenizer(store_path: str, student_prefix: str, student_tokenizer: Optional[str],
                                  teacher_tokenizer: Optional[str], student_cfg: Any) -> CrossTokenizerPlan:
    """Offline cross-tokenizer KD: the store has a byte-offset key, the student's dataset is its
    source text (document count and bytes; digests are checked as documents are read) and the
    student covers its tokenizer. Returns the plan (teacher side: the key's tokenizer)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_kd.data.tokenizers import load_tokenizer
    from megatron_kd.logits.byte_key import ByteKey, StudentText
    from megatron_kd.logits.manifest import strip_dataset_prefix

    if not student_tokenizer:
        raise ValueError("kd.cross_tokenizer needs data.tokenizer (the student's tokenizer) and indexed data")
    key = ByteKey(store_path)
    plan = offline_plan(key, student_tokenizer, teacher_tokenizer)
    if plan.student_vocab_size > student_cfg.vocab_size:
        raise ValueError(f"student vocab_size={student_cfg.vocab_size} is smaller than its tokenizer's "
                         f"{plan.student_vocab_size} ids ({student_tokenizer})")
    StudentText(IndexedDataset(strip_dataset_prefix(student_prefix), mmap=True), load_tokenizer(student_tokenizer), key)
    return plan


def offline_plan(key: Any, student_tokenizer: str, teacher_tokenizer: Optional[str] = None) -> CrossTokenizerPlan:
    """The plan of offline cross-tokenizer KD from a store's byte key (``key``: a ``ByteKey`` or a
    store path); the teacher's tokenizer is the copy in the store unless ``teacher_tokenizer``."""
    from megatron_kd.data.tokenizers import load_tokenizer
    from megatron_kd.logits.byte_key import ByteKey

    key = key if isinstance(key, ByteKey) else ByteKey(key)
    tok = load_tokenizer(student_tokenizer)
    return CrossTokenizerPlan(int(tok.vocab_size), key.vocab_size, str(student_tokenizer),
                              str(teacher_tokenizer or key.tokenizer_path))


ABSENT_LOGPROB = -1.0e4
"""Log-prob given to teacher ids a store did not keep: probability 0, yet part of the teacher's
vocabulary (so the hybrid's matched support, and the student's renormalisation over it, is the
same as online; ``-inf`` would drop those ids from both sides)."""


def dense_teacher_rows(target_ids: torch.Tensor, target_logprobs: torch.Tensor, vocab_size: int,
                       tp_rank: int = 0, tp_world: int = 1) -> torch.Tensor:
    """Stored sparse teacher targets ``[b, s, k]`` -> this TP rank's shard ``[b, s, ceil(V / tp)]``
    of teacher log-probs: the kept ids' values, :data:`ABSENT_LOGPROB` for the other ids of the
    vocabulary, -inf beyond it and on rows without any target. ``softmax(rows / T)`` is the
    teacher's ``softmax(logits / T)`` renormalised over the kept ids (ids >= ``vocab_size`` dropped)."""
    local = -(-vocab_size // tp_world)
    lo = tp_rank * local
    rel = target_ids - lo
    valid = (target_ids >= 0) & (target_ids < vocab_size)
    keep = valid & (rel >= 0) & (rel < local)
    cols = torch.arange(lo, lo + local + 1, device=target_logprobs.device)
    has = valid.any(-1, keepdim=True)
    base = torch.where(has & (cols < vocab_size), ABSENT_LOGPROB, float("-inf")).to(torch.float32)
    out = base.expand(*target_ids.shape[:-1], local + 1).contiguous()
    out.scatter_(-1, torch.where(keep, rel, local), torch.where(keep, target_logprobs.float(), float("-inf")))
    return out[..., :local]


def gather_aligned(teacher_logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Teacher rows ``[b, s_t, V]`` picked for each student position ``index`` [b, s] (-1 -> row 0).

    Whole rows are copied by ``index_select`` on the flattened positions (a ``gather`` over ``dim 1``
    with an index expanded to V columns costs ~12x as much on CPU for the same values).
    """
    b, s_t, v = teacher_logits.shape
    if teacher_logits.transpose(0, 1).is_contiguous():  # a [b, s, V] view of megatron's [s, b, V]
        flat, pos = teacher_logits.transpose(0, 1).reshape(s_t * b, v), index.clamp_min(0) * b
        pos = pos + torch.arange(b, device=index.device).unsqueeze(1)
    else:
        flat, pos = teacher_logits.reshape(b * s_t, v), index.clamp_min(0)
        pos = pos + s_t * torch.arange(b, device=index.device).unsqueeze(1)
    return flat.index_select(0, pos.reshape(-1)).reshape(*index.shape, v)


class CrossTokenizerForwardStep:
    """``forward_step_func`` of online cross-tokenizer KD (see the module docstring).

    Args:
        kd: ``DistillConfig.kd`` (cross_tokenizer, uld_top_m, hybrid_*_weight, temperature, alpha...).
        plan: the :class:`CrossTokenizerPlan` (each side's real vocabulary).
        vocab_map: matched ids for ``hybrid``, the projection array for ``projected`` (:func:`build_plan_vocab_map`).
        state: the shared ``KDState`` (alpha schedule step).
        evaluation: report held-out ``lm``, ``kd`` and ``xtok_aligned`` only.
        with_teacher: evaluation with the teacher (``kd.eval_with_teacher``); False: the held-out
            ``lm`` only (the teacher does not run: :class:`DistillationModel` ``run_teacher``).
    """

    def __init__(self, kd: Any, plan: CrossTokenizerPlan, vocab_map: Any = None, state: Any = None,
                 evaluation: bool = False, offline: bool = False, with_teacher: bool = True):
        from megatron_kd.distill.forward_step import KDState

        if kd.cross_tokenizer not in CROSS_TOKENIZER_LOSSES:
            raise ValueError(f"kd.cross_tokenizer={kd.cross_tokenizer!r} is not one of {', '.join(CROSS_TOKENIZER_LOSSES)}")
        if kd.cross_tokenizer in ("hybrid", "projected") and vocab_map is None:
            raise ValueError(f"kd.cross_tokenizer={kd.cross_tokenizer} needs a vocab map (build_plan_vocab_map)")
        self.kd, self.plan, self.vocab_map, self.evaluation = kd, plan, vocab_map, evaluation
        self.offline = offline
        self.lm_only = evaluation and not with_teacher
        self.state = state or KDState()

    def __call__(self, data_iterator: Iterator[dict[str, Any]], model: torch.nn.Module):
        batch = batch_to_device(next(data_iterator))
        if self.offline or self.lm_only:  # stored targets (ByteKeyedTargetsDataset), or no KD: no teacher
            return model(batch["tokens"], batch["position_ids"], None), partial(self.loss_func, batch, None)
        model.loss_mask = batch["loss_mask"]
        model.teacher_inputs = (batch["teacher_tokens"], batch["teacher_position_ids"])
        output = model(batch["tokens"], batch["position_ids"], None)
        teacher = model.pop_teacher_output()
        return output, partial(self.loss_func, batch, teacher)

    def kd_per_token(self, student: torch.Tensor, teacher_rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The cross-tokenizer KD term per student position (0 outside ``mask``)."""
        kd = self.kd
        if kd.cross_tokenizer == "uld":
            return uld_loss(student, teacher_rows, kd.temperature, kd.uld_top_m, loss_mask=mask,
                            chunk_size=kd.chunk_size)
        if kd.cross_tokenizer == "projected":
            return projected_kd_loss(student, teacher_rows, self.vocab_map, kd.temperature, loss_mask=mask,
                                     chunk_size=kd.chunk_size)
        return hybrid_kd_loss(student, teacher_rows, self.vocab_map, kd.temperature, kd.hybrid_matched_weight,
                              kd.hybrid_unmatched_weight, kd.uld_top_m, loss_mask=mask, chunk_size=kd.chunk_size)

    def loss_func(self, batch: dict[str, torch.Tensor], teacher_logits: Optional[torch.Tensor],
                  output_tensor: torch.Tensor):
        """``(loss_sum, num_tokens, report)`` of one micro-batch (megatron's per-token form)."""
        kd = self.kd
        student = mask_padded_vocab(output_tensor, self.plan.student_vocab_size)
        labels, loss_mask = batch["labels"], batch["loss_mask"]
        mask = (loss_mask != 0) & (labels != kd.ignore_index)
        alpha = alpha_at(kd, self.state.step, self.state.total_steps)
        scale = kd.temperature ** 2 if kd.t2_scale else 1.0
        if self.lm_only:
            rows, kd_mask = None, torch.zeros_like(mask)
        elif self.offline:
            if "target_ids" in batch:
                from megatron_kd.losses.vocab_parallel import resolve_tp

                tp = resolve_tp()
                rows = dense_teacher_rows(batch["target_ids"], batch["target_logprobs"], self.plan.teacher_vocab_size,
                                          tp.rank, tp.world_size)
                kd_mask = mask & (batch["xtok_index"] >= 0) & (batch["target_ids"][..., 0] >= 0)
            elif not self.evaluation:
                raise ValueError("offline cross-tokenizer KD: the batch has no target_ids/target_logprobs: wrap the "
                                 "training dataset in ByteKeyedTargetsDataset")
            else:  # held-out split: LM loss only
                rows, kd_mask = None, torch.zeros_like(mask)
        else:
            if teacher_logits is None:
                raise RuntimeError("cross-tokenizer KD: no teacher logits for this micro-batch (not a "
                                   "DistillationModel?)")
            teacher = mask_padded_vocab(teacher_logits, self.plan.teacher_vocab_size)
            kd_mask = mask & (batch["xtok_index"] >= 0)
            rows = gather_aligned(teacher, batch["xtok_index"])
        if rows is None:
            kd_tok = torch.zeros_like(mask, dtype=torch.float32)
        else:
            with contextlib.nullcontext() if alpha > 0 else torch.no_grad():
                kd_tok = self.kd_per_token(student, rows, kd_mask)
        kd_sum = kd_tok.sum()
        with contextlib.nullcontext() if alpha < 1 else torch.no_grad():
            lm = lm_per_token(student, labels.masked_fill(~mask, 0), inplace=kd.lm_inplace)
            lm_sum = torch.where(mask, lm, 0.0).sum()
        count, aligned = mask.sum(), kd_mask.sum()
        total = (1.0 - alpha) * lm_sum + (alpha * scale) * kd_sum

        def pair(a, b):
            return torch.stack((a.detach().float(), b.float()))

        report = {"lm": pair(lm_sum, count)}
        if not self.lm_only:
            report.update(kd=pair(kd_sum, aligned), xtok_aligned=pair(aligned, count))
        if self.evaluation:
            return lm_sum, count.to(torch.int), report
        report["total"] = pair(total, count)
        report["alpha"] = torch.tensor([alpha, 1.0], dtype=torch.float32, device=lm_sum.device)
        return total, count.to(torch.int), report
