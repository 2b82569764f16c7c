"""Capturing a GPTModel's output layer: the model returns its final hidden states, not logits.

Megatron's ``GPTModel`` ends with ``logits = output_layer(hidden, weight=...)`` (a column-parallel
layer over the vocabulary; tied embeddings pass the embedding as ``weight``). While a
:class:`HeadCapture` is active, that output layer hands back its input - the final hidden states
after the final norm, ``[s, b, H]`` (``[s/tp, b, H]`` under sequence parallelism) - and records
the weight it would have used. Fused heads (the distillation loss, the logits precompute, MiniPLM
scoring) then produce logits chunk by chunk themselves and never hold ``[tokens, V]`` whole.
Inactive, the layer behaves exactly as before.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.utils import get_attr_wrapped_model


class HeadCapture:
    """Wraps one output layer's ``forward`` (installed once per layer, see :func:`capture_for`)."""

    def __init__(self, layer: torch.nn.Module):
        self.layer = layer
        self.active = False
        self.weight: Optional[torch.Tensor] = None
        original = layer.forward

        def forward(input_, weight=None, runtime_gather_output=None, **kwargs):
            if not self.active:
                return original(input_, weight=weight, runtime_gather_output=runtime_gather_output, **kwargs)
            self.weight = weight if weight is not None else layer.weight
            return input_, None

        layer.forward = forward

    @property
    def sequence_parallel(self) -> bool:
        """Whether the layer's input is a sequence-parallel shard."""
        return bool(getattr(self.layer, "sequence_parallel", False))

    def pop_weight(self) -> torch.Tensor:
        """The output weight recorded by the last captured forward (then forgotten)."""
        weight, self.weight = self.weight, None
        if weight is None:
            raise RuntimeError("fused KD head: the model's output layer did not run during the captured forward")
        return weight


def capture_for(model: Any) -> Optional[HeadCapture]:
    """The :class:`HeadCapture` of ``model``'s output layer (installed on first use), or None when
    the model (under its wrappers) has no output layer (not the last pipeline stage)."""
    if model is None:
        return None
    try:
        layer = get_attr_wrapped_model(model, "output_layer", allow_none=True)
    except RuntimeError:  # no stage of this model below the wrappers has one
        return None
    if layer is None:
        return None
    cap = layer.__dict__.get("_kd_head_capture")
    if cap is None:
        cap = HeadCapture(layer)
        layer.__dict__["_kd_head_capture"] = cap
    return cap
