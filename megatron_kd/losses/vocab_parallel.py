"""Vocab-parallel plumbing shared by the dense and sparse KD losses.

Megatron keeps logits split over the vocabulary across the tensor-parallel (TP) group: rank ``r``
holds columns ``[r * V_local, (r + 1) * V_local)`` of ``[s, b, V]`` as an ``[s, b, V_local]``
tensor. Every loss here works on such shards without gathering the vocabulary: per token it
all-reduces a max, a few sums and a few per-token partials across the group.

This module holds what the dense and sparse losses share:

* :class:`TPContext` / :func:`resolve_tp` - which group, rank, world size and vocab offset;
* :func:`all_reduce_` - an in-place all-reduce that is a no-op for a single process;
* :class:`ChunkedLoss` - the custom autograd function that runs a per-chunk kernel over token
  chunks, keeps only the analytic gradient (one tensor shaped like the student logits) between
  forward and backward, and scales it by the incoming per-token gradient in backward.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch
import torch.distributed as dist

Rows = Union[slice, torch.Tensor]
"""A chunk of flattened token rows: a slice, or an int64 index tensor (masked tokens skipped)."""

KernelFn = Callable[[Rows, bool, Optional[torch.Tensor]], "tuple[torch.Tensor, Optional[torch.Tensor]]"]
"""``kernel(rows, need_grad, out) -> (loss[n], grad[n, V_local] or None)`` in the compute dtype.

``grad`` is d(loss)/d(student logits of those rows), already including the 1/T factor. ``out``,
when not None, is the gradient buffer's slice for these rows (same dtype): a kernel may write the
gradient there and return it, saving a copy."""

DEFAULT_CHUNK_ELEMENTS = 1 << 22
"""Token chunk size target on CPU, in logits per chunk (a [chunk, V_local] fp32 buffer of 16 MiB),
per intra-op thread (up to 4): each kernel should get a few million elements per thread, or the
fork/join cost of many mid-size kernels shows, badly so on a shared machine. The scratch memory
is a few such buffers (forward KL: two fp32), independent of the number of tokens."""

CUDA_CHUNK_ELEMENTS = 1 << 25
"""Token chunk size target on GPUs (128 MiB fp32 buffers): fewer, longer kernels."""


@dataclass(frozen=True)
class TPContext:
    """The tensor-parallel group a loss reduces over (``group=None``: one process, no collectives)."""

    group: Optional[dist.ProcessGroup]
    rank: int
    world_size: int

    def vocab_offset(self, local_vocab: int) -> int:
        """First global vocabulary id held by this rank (megatron's contiguous split)."""
        return self.rank * local_vocab


def resolve_tp(tp_group: Optional[dist.ProcessGroup] = None) -> TPContext:
    """The TP context for ``tp_group``; ``None`` means megatron's TP group when one is active.

    With ``tp_group=None``: if ``megatron.core.parallel_state`` is initialised and its TP size is
    above 1, use ``get_tensor_model_parallel_group()``; otherwise run single-process (no
    collectives), e.g. TP=1 training, unit tests, notebooks.
    """
    if tp_group is None:
        parallel_state = sys.modules.get("megatron.core.parallel_state")
        if parallel_state is None:  # never imported, so never initialised: skip the slow import
            return TPContext(None, 0, 1)
        if (
            not parallel_state.model_parallel_is_initialized()
            or parallel_state.get_tensor_model_parallel_world_size() <= 1
        ):
            return TPContext(None, 0, 1)
        tp_group = parallel_state.get_tensor_model_parallel_group()
    size = dist.get_world_size(tp_group)
    if size <= 1:
        return TPContext(None, 0, 1)
    return TPContext(tp_group, dist.get_rank(tp_group), size)


def all_reduce_(tensor: torch.Tensor, tp: TPContext, op: str = "sum") -> torch.Tensor:
    """All-reduce ``tensor`` in place over ``tp`` (``op``: "sum" or "max"); no-op on one process."""
    if tp.group is not None:
        red = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        dist.all_reduce(tensor, op=red, group=tp.group)
    return tensor


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64 (gradcheck, references), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def take_rows(x2d: torch.Tensor, rows: Rows, dtype: torch.dtype,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A ``dtype`` copy of ``x2d[rows]`` (into ``out`` if given) that the caller may modify."""
    if out is None:
        if isinstance(rows, slice):
            return x2d[rows].to(dtype, copy=True)
        return x2d.index_select(0, rows).to(dtype)
    if isinstance(rows, slice):
        return out.copy_(x2d[rows])
    if x2d.dtype == dtype:
        return torch.index_select(x2d, 0, rows, out=out)
    return out.copy_(x2d.index_select(0, rows))


class Workspace:
    """Scratch buffers reused by every chunk of one loss call, so the hot loop does not allocate
    (and page-fault) several [chunk, V_local] tensors per chunk. Views handed out for one chunk
    are overwritten by the next: copy anything that must survive."""

    def __init__(self, width: int, device: torch.device):
        self.width, self.device = width, device
        self._bufs: dict = {}

    def get(self, name: str, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """A [rows, width] ``dtype`` view of the buffer called ``name``."""
        buf = self._bufs.get(name)
        if buf is None or buf.shape[0] < rows or buf.dtype != dtype:
            buf = torch.empty(rows, self.width, dtype=dtype, device=self.device)
            self._bufs[name] = buf
        return buf[:rows]


def auto_chunk(local_vocab: int, chunk_size: Optional[int], device: Optional[torch.device] = None) -> int:
    """Tokens per chunk: ``chunk_size`` if given, else the element budget / V_local.

    The budget is :data:`CUDA_CHUNK_ELEMENTS` on GPUs and :data:`DEFAULT_CHUNK_ELEMENTS` times
    ``min(torch.get_num_threads(), 4)`` on CPU.
    """
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1 (tokens per chunk) or None")
        return int(chunk_size)
    if device is not None and device.type == "cuda":
        budget = CUDA_CHUNK_ELEMENTS
    else:
        budget = DEFAULT_CHUNK_ELEMENTS * min(max(torch.get_num_threads(), 1), 4)
    return max(1, budget // max(1, local_vocab))


def plan_chunks(num_rows: int, chunk: int, mask: Optional[torch.Tensor]) -> Iterator[Rows]:
    """Token chunks over all rows (slices), or over the rows where ``mask`` is true (indices).

    Every TP rank must see the same mask so that all ranks run the same collectives.
    """
    if mask is None:
        for start in range(0, num_rows, chunk):
            yield slice(start, min(start + chunk, num_rows))
        return
    active = torch.nonzero(mask.reshape(-1), as_tuple=False).reshape(-1)
    for start in range(0, active.numel(), chunk):
        yield active[start : start + chunk]


def flat_mask(loss_mask: Optional[torch.Tensor], lead_shape: torch.Size) -> Optional[torch.Tensor]:
    """``loss_mask`` (any dtype, shape = the logits' leading shape) as a flat bool tensor."""
    if loss_mask is None:
        return None
    if tuple(loss_mask.shape) != tuple(lead_shape):
        raise ValueError(
            f"loss_mask shape {tuple(loss_mask.shape)} must equal the logits' leading shape "
            f"{tuple(lead_shape)}"
        )
    return loss_mask.reshape(-1) != 0


class ChunkedLoss(torch.autograd.Function):
    """Per-token loss computed chunk by chunk, with the analytic gradient produced in forward.

    ``forward(student2d, kernel, chunk, mask, out_dtype, retain, want_grad)``: ``student2d`` is
    [N, V_local]; ``kernel`` computes (loss, grad) for a chunk of rows (see :data:`KernelFn`);
    ``want_grad`` is False under ``torch.no_grad()`` (inside ``forward`` grad mode is always off
    and ``needs_input_grad`` does not tell), so no gradient is computed for nothing. The gradient
    buffer (student dtype, [N, V_local]) is the only thing kept for backward, so the peak extra
    memory is one logits-sized tensor plus O(chunk x V_local) scratch. Rows outside ``mask`` get
    loss 0 and gradient 0 and are never computed.

    Backward scales the buffer in place by the incoming per-token gradient and returns it, so by
    default it can run once per forward (a second backward raises). With ``retain=True`` backward
    returns a scaled copy and keeps the buffer, so it can run again (``retain_graph=True``,
    ``torch.autograd.gradcheck``) at the cost of one more logits-sized tensor. Other inputs (the
    teacher, sparse targets) are only read by the kernel in forward and receive no gradient.
    """

    @staticmethod
    def forward(ctx, student2d, kernel, chunk, mask, out_dtype, retain, want_grad):  # noqa: D102
        need_grad = bool(want_grad and ctx.needs_input_grad[0])
        num_rows = student2d.shape[0]
        loss = torch.zeros(num_rows, dtype=out_dtype, device=student2d.device)
        grad = None
        if need_grad:
            grad = torch.zeros_like(student2d) if mask is not None else torch.empty_like(student2d)
        direct = need_grad and grad.dtype == out_dtype
        for rows in plan_chunks(num_rows, chunk, mask):
            out = grad[rows] if direct and isinstance(rows, slice) else None
            row_loss, row_grad = kernel(rows, need_grad, out)
            if isinstance(rows, slice):
                loss[rows] = row_loss
                if need_grad and row_grad is not out:
                    grad[rows] = row_grad
            else:
                loss.index_copy_(0, rows, row_loss.to(out_dtype))
                if need_grad:
                    grad.index_copy_(0, rows, row_grad.to(grad.dtype))
        ctx.grad_buffer = grad
        ctx.retain = retain
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: D102
        grad = ctx.grad_buffer
        if grad is None:
            if ctx.needs_input_grad[0]:
                raise RuntimeError(
                    "KD loss backward ran twice on one graph: the analytic gradient buffer is "
                    "consumed by the first backward - pass retain_graph=True to the loss function"
                )
            return (None,) * 7
        if ctx.retain:
            return (grad * grad_loss.unsqueeze(-1),) + (None,) * 6
        ctx.grad_buffer = None
        grad.mul_(grad_loss.unsqueeze(-1))
        return (grad,) + (None,) * 6


def run_chunked(student: torch.Tensor, kernel: KernelFn, chunk: int,
                loss_mask: Optional[torch.Tensor], out_dtype: torch.dtype,
                retain_graph: bool = False) -> torch.Tensor:
    """Apply :class:`ChunkedLoss` to ``student`` [..., V_local]; returns the loss [...]."""
    lead = student.shape[:-1]
    student2d = student.reshape(-1, student.shape[-1])
    mask = flat_mask(loss_mask, lead)
    want_grad = torch.is_grad_enabled() and student.requires_grad
    loss = ChunkedLoss.apply(student2d, kernel, chunk, mask, out_dtype, bool(retain_graph), want_grad)
    return loss.view(lead)
