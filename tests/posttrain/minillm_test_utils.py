"""Helpers for the MiniLLM tests: move tensors out of spawned workers by value."""
import numpy as np
import torch


def plain(obj):
    """Tensors -> numpy arrays (pickled by value: a worker may exit before the parent reads the
    result queue, which breaks torch's shared-memory tensor passing)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone().numpy()
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


def tensors(obj):
    """Inverse of :func:`plain`."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tensors(v) for v in obj)
    return obj
