"""Runtime: distributed init (NCCL or gloo), megatron parallel_state, seeds, device.

The CPU compatibility layer for megatron-core lives in :mod:`megatron_kd.runtime.cpu` and is
activated by :func:`init_distributed` only when CUDA is absent.
"""
from megatron_kd.runtime.distributed import (
    ParallelConfig,
    barrier,
    destroy_distributed,
    device,
    init_distributed,
    is_main_process,
    rank,
    set_seed,
    world_size,
)

__all__ = [
    "ParallelConfig",
    "barrier",
    "destroy_distributed",
    "device",
    "init_distributed",
    "is_main_process",
    "rank",
    "set_seed",
    "world_size",
]
