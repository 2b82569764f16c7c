"""Forward-only passes over a model stage for any TP/PP, reduced to small per-row results.

Evaluation never needs the logits themselves outside the last pipeline stage: it needs a few
numbers per sequence (summed log-probs, a sampled token). :func:`forward_reduce` runs a list of
equally shaped micro-batches through the model (megatron-core's pipeline schedule with
``forward_only=True`` when PP > 1, a plain forward otherwise), applies ``reduce_fn`` to the
vocab-parallel logits on the last stage, and broadcasts the small results to every stage, so all
ranks return the same values. Data-parallel helpers split work over the DP group and put the
per-item results back together in order.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_kd.runtime.distributed import device
from megatron_kd.runtime.parallel import dp_all_gather_object, dp_group, dp_sum

ReduceFn = Callable[[torch.Tensor, int], torch.Tensor]
"""``reduce_fn(logits [b, s, V/TP], microbatch_index) -> float tensor [b, width]`` (last stage;
it may use TP collectives: every rank of the last stage's TP group calls it)."""


def position_ids_like(tokens: torch.Tensor) -> torch.Tensor:
    """[b, s] positions 0..s-1 for a right-padded batch (padding sits after each row's tokens)."""
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def forward_reduce(model: torch.nn.Module, microbatches: Sequence[torch.Tensor], reduce_fn: ReduceFn,
                   width: int) -> list[torch.Tensor]:
    """Run ``microbatches`` (int64 token tensors [b, s], same shape when PP > 1) forward-only.

    Every rank of the model-parallel group must call this with the same micro-batches. Returns
    one float64 CPU tensor [b, width] per micro-batch, identical on all TP/PP ranks. Causal
    attention, so right padding does not change any earlier position's logits.
    """
    if not microbatches:
        return []
    dev = device()
    mbs = [mb.to(dev, non_blocking=True) for mb in microbatches]
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    with torch.no_grad():
        if pp == 1:
            return [reduce_fn(model(mb, position_ids_like(mb), None), i).double().cpu()
                    for i, mb in enumerate(mbs)]
        return _pipeline_forward_reduce(model, mbs, reduce_fn, width)


def _pipeline_forward_reduce(model, mbs, reduce_fn, width) -> list[torch.Tensor]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    shape = mbs[0].shape
    if any(mb.shape != shape for mb in mbs):
        raise ValueError("pipeline-parallel evaluation needs equally shaped micro-batches: pad them")
    order = iter(range(len(mbs)))

    def forward_step(data_iterator, stage):
        i = next(data_iterator)
        tokens = mbs[i]
        # Non-first stages ignore the tokens: their input is the activation the schedule received.
        output = stage(tokens, position_ids_like(tokens), None)

        def loss_func(logits):
            out = reduce_fn(logits, i).double()
            return torch.zeros((), device=logits.device), {"index": i, "out": out}

        return output, loss_func

    store = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=order, model=[model], num_microbatches=len(mbs),
        seq_length=shape[1], micro_batch_size=shape[0], forward_only=True,
    )
    dev = mbs[0].device
    result = torch.zeros(len(mbs), shape[0], width, dtype=torch.float64, device=dev)
    if parallel_state.is_pipeline_last_stage():
        for item in store:
            result[item["index"]] = item["out"].to(dev)
    dist.broadcast(result, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return [r.cpu() for r in result]


def data_parallel_info() -> tuple[int, int]:
    """(rank, size) of this process in its data-parallel group ((0, 1) without parallel_state)."""
    dp = dp_group()
    return dp.rank, dp.world_size


def dp_shard(n_items: int) -> range:
    """Indices of ``n_items`` this data-parallel rank handles (strided: balanced, deterministic)."""
    rank, size = data_parallel_info()
    return range(rank, n_items, size)


def dp_gather(n_items: int, mine: dict[int, Any]) -> list[Any]:
    """Reassemble per-item results computed by :func:`dp_shard` on every DP rank (in item order)."""
    merged: dict[int, Any] = {}
    for part in dp_all_gather_object(mine):
        merged.update(part)
    return [merged[i] for i in range(n_items)]


def dp_all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a float64 tensor over the data-parallel group (in place; returned)."""
    return dp_sum(values)


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True):
    """Rank-0 tqdm bar (``megatron_kd.utils.progress.progress``), or a no-op when disabled."""
    if not enabled:
        return _NullBar()
    from megatron_kd.utils.progress import progress

    return progress(total, desc, unit=unit)
