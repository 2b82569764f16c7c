"""Megatron-core 0.16.1 on a CUDA-less PyTorch: the one place that knows about it.

megatron-core hard-codes CUDA in a few places (``device="cuda"`` literals in the pipeline
schedules and optimizer, ``torch.cuda.current_device()`` buffers, the CUDA RNG tracker, a
``torch.cuda.FloatTensor`` type assertion in gradient clipping). On a machine without CUDA,
:func:`install` makes those paths run on the CPU:

* a :class:`torch.overrides.TorchFunctionMode` rewrites ``device="cuda"``/``"cuda:N"``/int device
  arguments of torch factory calls to ``"cpu"``;
* ``torch.cuda.{current_device, get_rng_state, set_rng_state, manual_seed, synchronize,
  empty_cache}`` and ``Tensor.cuda`` are replaced by CPU equivalents (the "CUDA" RNG becomes the
  CPU default generator, so megatron's RNG-tracker forks still isolate dropout streams);
* megatron's RNG tracker state getters/setters and ``clip_grad_by_total_norm_fp32`` get CPU
  versions.

Nothing is changed when CUDA is available, except one fix that applies to any machine without
Transformer Engine: megatron-core 0.16.1's MoE router tests ``te_general_gemm is not None`` but only
defines that name when TE imports, so :func:`patch_missing_te_names` binds it to None (the router then
uses its plain ``torch.mm`` path). Nothing outside ``megatron_kd.runtime`` needs to know.
"""
from __future__ import annotations

import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_LOCK = threading.Lock()
_INSTALLED = False
_MODE: "_CudaDeviceToCpu | None" = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # megatron passes torch.cuda.current_device() ints around
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaDeviceToCpu(TorchFunctionMode):
    """Rewrites CUDA ``device=`` arguments of any torch function call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to or func is torch.Tensor.cuda:
            args = tuple("cpu" if _is_cuda_device(a) and not isinstance(a, int) else a for a in args)
        return func(*args, **kwargs)


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """CPU twin of megatron's ``clip_grad_by_total_norm_fp32`` (which asserts CUDA tensors)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    for param in parameters:
        grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
        if grad is not None:
            grad.detach().mul_(clip_coeff)


def cuda_available() -> bool:
    """True when PyTorch sees a usable CUDA device (then :func:`install` is a no-op)."""
    return torch.cuda.is_available()


def patch_missing_te_names() -> None:
    """Bind the Transformer-Engine-only names megatron-core's MoE code reads unconditionally to None
    when TE is absent (``moe_utils.te_general_gemm``). Idempotent; no-op with TE."""
    from megatron.core.transformer.moe import moe_utils

    if not getattr(moe_utils, "HAVE_TE", False) and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def install() -> bool:
    """Activate the CPU compatibility layer if CUDA is absent. Idempotent, per process.

    Returns True when the layer is (now) active, False on a CUDA machine.
    """
    global _INSTALLED, _MODE
    patch_missing_te_names()
    if cuda_available():
        return False
    with _LOCK:
        if _INSTALLED:
            return True
        torch.cuda.current_device = lambda: torch.device("cpu")
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.empty_cache = lambda *a, **k: None
        torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
        torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
        # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
        torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
        torch.cuda.manual_seed_all = lambda seed: None
        torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
        torch.cuda.random.set_rng_state = torch.cuda.set_rng_state
        torch.Tensor.cuda = lambda self, *a, **k: self

        from megatron.core.optimizer import optimizer as mcore_optimizer
        from megatron.core.tensor_parallel import random as mcore_random

        mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
        mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
        mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu

        _MODE = _CudaDeviceToCpu()
        _MODE.__enter__()  # stays active for the life of the process
        _INSTALLED = True
    return True


def is_installed() -> bool:
    """Whether :func:`install` activated the layer in this process."""
    return _INSTALLED
