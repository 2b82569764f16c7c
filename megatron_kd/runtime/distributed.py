"""Process-group setup: torch.distributed from torchrun's environment, megatron parallel_state.

One process without torchrun works too (world size 1, a private TCP rendezvous on loopback).
"""
from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_kd.runtime import cpu


@dataclass
class ParallelConfig:
    """Model-parallel layout. The data-parallel size is what is left of the world size."""

    tensor_parallel: int = 1
    """Tensor-parallel (TP) size: attention heads and the vocabulary are split this many ways."""
    pipeline_parallel: int = 1
    """Pipeline-parallel (PP) size: the layers are split into this many consecutive stages."""
    context_parallel: int = 1
    """Context-parallel (CP) size (GPU only: the local SDPA attention does not shard the sequence)."""
    expert_parallel: int = 1
    """Expert-parallel (EP) size for mixture-of-experts models: the routed experts of each MoE layer
    are split this many ways over the data-parallel ranks (megatron's ``expert_model_parallel_size``;
    it must divide the data-parallel size times CP and the expert count). 1 for dense models."""

    @property
    def expert_model_parallel_size(self) -> int:
        """megatron-core's name for :attr:`expert_parallel`."""
        return self.expert_parallel

    def validate(self, world_size: int) -> None:
        """Raise ``ValueError`` (one line) if this layout does not fit ``world_size`` processes."""
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel", "expert_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        mp = self.tensor_parallel * self.pipeline_parallel * self.context_parallel
        if world_size % mp:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_parallel*pipeline_parallel*"
                f"context_parallel={mp}: launch a multiple of {mp} processes or change parallel.*"
            )
        # megatron's expert groups: EP ranks come out of the data-parallel (x CP) ranks of one stage.
        dp_cp = world_size // (self.tensor_parallel * self.pipeline_parallel)
        if dp_cp % self.expert_parallel:
            raise ValueError(
                f"parallel.expert_parallel={self.expert_parallel} does not divide the data-parallel*context_parallel "
                f"size {dp_cp} (world {world_size} / (tensor_parallel*pipeline_parallel)): launch "
                f"{self.tensor_parallel * self.pipeline_parallel * self.expert_parallel}*k processes or lower it"
            )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    """The device this process computes on: its local CUDA GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(parallel: ParallelConfig | None = None, backend: str | None = None) -> None:
    """Initialise torch.distributed (NCCL with CUDA, else gloo) and megatron's parallel_state.

    Reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` as set by
    ``torchrun``; without them runs as a single process. Installs the CPU compatibility layer when
    CUDA is absent. Safe to call twice with the same layout.
    """
    from megatron.core import parallel_state

    parallel = parallel or ParallelConfig()
    cpu.install()
    if not dist.is_initialized():
        launched = "RANK" in os.environ
        world_size = int(os.environ["WORLD_SIZE"]) if launched else 1
        parallel.validate(world_size)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if launched:
            dist.init_process_group(backend=backend)
        else:
            # A private loopback rendezvous, passed explicitly: writing RANK/MASTER_PORT into
            # os.environ would leak into child processes, which would then think torchrun
            # launched them and try to bind the same port.
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1)
    else:
        parallel.validate(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() == parallel.tensor_parallel
            and parallel_state.get_pipeline_model_parallel_world_size() == parallel.pipeline_parallel
            and parallel_state.get_expert_model_parallel_world_size() == parallel.expert_parallel
        ):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        context_parallel_size=parallel.context_parallel,
        expert_model_parallel_size=parallel.expert_parallel,
    )


def destroy_distributed() -> None:
    """Tear down parallel_state and the default process group (tests, end of a command)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def set_seed(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron's model-parallel RNG tracker.

    Every rank gets the same base seed; megatron derives distinct tensor-parallel streams
    (for dropout inside TP regions) from it. Requires :func:`init_distributed` first.
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)  # on CPU the tracker seeding above touches the default generator


def rank() -> int:
    """Global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Global world size (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on global rank 0: the one that prints progress and writes shared files."""
    return rank() == 0


def barrier() -> None:
    """Barrier across all ranks (no-op for a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
