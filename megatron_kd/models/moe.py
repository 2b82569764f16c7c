"""Mixture-of-experts helpers around megatron-core's MoE layers: the router (load-balancing) loss
as a training metric.

megatron-core's ``TopKRouter`` records each MoE layer's auxiliary loss (before its coefficient) in
a process-global tracker during training forwards with ``moe_aux_loss_coeff > 0``; the loss
itself reaches the gradients through ``MoEAuxLossAutoScaler``. :func:`router_loss_metrics` turns
the tracker into step metrics (mean over MoE layers and micro-batches, averaged over data-parallel
ranks, summed over pipeline stages' layers) and clears it. Frozen teachers run in eval mode, so
they never add to it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

#: megatron's tracker name -> the metric key megatron-kd logs.
METRIC_NAMES = {"load_balancing_loss": "moe_aux_loss", "seq_load_balancing_loss": "moe_seq_aux_loss",
                "global_load_balancing_loss": "moe_global_aux_loss", "z_loss": "moe_z_loss"}


def router_loss_metrics(num_microbatches: int, clear: bool = True) -> dict[str, float]:
    """``{"moe_aux_loss": ...}`` for the step just run (empty for dense models / no aux loss).

    Collective over the pipeline and data-parallel groups when a tracker entry exists (all ranks
    of a MoE student with an aux loss have one, so the collectives match).
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    tracker = get_moe_layer_wise_logging_tracker()
    out: dict[str, float] = {}
    for name in sorted(tracker):
        values = tracker[name]["values"].detach().float().clone()
        if dist.is_initialized():
            dist.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
            dp = parallel_state.get_data_parallel_group()
            if dist.get_world_size(dp) > 1:
                dist.all_reduce(values, group=dp)
                values /= dist.get_world_size(dp)
        layers = int((values != 0).sum().item()) or 1
        out[METRIC_NAMES.get(name, f"moe_{name}")] = float(values.sum().item()) / (layers * max(num_microbatches, 1))
    if clear and tracker:
        clear_aux_losses_tracker()
    return out


def count_moe_layers(model: torch.nn.Module) -> int:
    """MoE layers in a (possibly wrapped) model stage."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return sum(isinstance(m, MoELayer) for m in model.modules())
