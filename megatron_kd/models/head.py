"""Capturing a GPTModel's output layer: the model returns its final hidden states, not logits.

Megatron's ``GPTModel`` ends with ``logits = output_layer(hidden, weight=...)`` (a column-parallel
layer over the vocabulary; tied embeddings pass the embedding as ``weight``). While a
:class:`HeadCapture` is active, that output layer hands back its input - the final hidden states
after the final norm, ``[s, b, H]`` (``[s/tp, b, H]`` under sequence parallelism) - and records
the weight it would have used. Fused heads (the distillation loss, the logits precompute, MiniPLM
scoring) then produce logits chunk by chunk themselves and never hold ``[tokens, V]`` whole.
Inactive, the layer behaves exactly as before.

With ``keep_logits`` the layer computes its logits as usual but keeps them (``[s, b, V/tp]``, the
layer's own layout, :meth:`HeadCapture.pop_logits`) and hands back its input: megatron's
``GPTModel`` ends with a ``[s, b] -> [b, s]`` transposed copy of what the layer returns, which for
the logits is a full [tokens, V] copy in forward and two more of their gradient in backward (the
output layer's backward copies a non-contiguous gradient twice); the hidden states are V/H times
smaller. Same logits, same gradients, bit for bit (:func:`megatron_kd.training.lm_loss.lm_forward_step`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from megatron.core.utils import get_attr_wrapped_model


class HeadCapture:
    """Wraps one output layer's ``forward`` (installed once per layer, see :func:`capture_for`)."""

    def __init__(self, layer: torch.nn.Module):
        self.layer = layer
        self.active = False
        self.keep_logits = False
        """While active: run the layer and keep its logits (instead of recording its weight)."""
        self.weight: Optional[torch.Tensor] = None
        self.logits: Optional[torch.Tensor] = None
        original = layer.forward

        def forward(input_, weight=None, runtime_gather_output=None, **kwargs):
            if not self.active:
                return original(input_, weight=weight, runtime_gather_output=runtime_gather_output, **kwargs)
            if self.keep_logits:
                self.logits, _ = original(input_, weight=weight, runtime_gather_output=runtime_gather_output,
                                          **kwargs)
                return input_, None
            self.weight = weight if weight is not None else layer.weight
            return input_, None

        layer.forward = forward

    @property
    def sequence_parallel(self) -> bool:
        """Whether the layer's input is a sequence-parallel shard."""
        return bool(getattr(self.layer, "sequence_parallel", False))

    @contextlib.contextmanager
    def capturing(self, keep_logits: bool = False) -> Iterator["HeadCapture"]:
        """Within: the layer hands back its input and records its weight (``keep_logits``: keeps its
        logits instead); the next :meth:`pop_weight` / :meth:`pop_logits` reads what it recorded."""
        self.active, self.keep_logits = True, keep_logits
        try:
            yield self
        finally:
            self.active = self.keep_logits = False

    def pop_logits(self) -> torch.Tensor:
        """The logits ``[s, b, V/tp]`` kept by the last ``keep_logits`` forward (then forgotten)."""
        logits, self.logits = self.logits, None
        if logits is None:
            raise RuntimeError("LM head: the model's output layer did not run during the captured forward")
        return logits

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


CPU_CHUNK_BYTES = 1 << 23
"""On CPU, fused heads produce at most about this many bytes of fp32 logits per chunk (8 MiB), so
that the chunk is still in cache when the NLL / top-k reads it right after the matmul (a [2048, V]
chunk goes to DRAM and back several times, and each fresh allocation of it page-faults)."""
CPU_MIN_CHUNK_ROWS = 64
"""Fewest rows per CPU chunk (the matmul streams the whole output weight once per chunk)."""
CPU_MAX_CHUNK_ROWS = 256
"""Most rows per CPU chunk. 256 rows (4 MiB of logits at V = 4,096, 8 MiB at 8,192) measured faster
than 64-128 rows (2 MiB, the first setting: the output weight, 4-8 MiB here, is streamed once per
chunk, and the per-chunk ops are fewer) and than 320-512 rows (the chunk falls out of cache):
micro-benchmarks on the 2-core EPYC VM, 1 thread, 2026-12-06 (BENCHMARKS.md, issue 15)."""
_MIN_TAIL_ROWS = 16
"""A last chunk shorter than this joins the one before it: MKL's sgemm gives a row the same bits
at every row count M >= 4 (checked for M = 4 ... 4,100), but not at M <= 3 (another code path)."""


def cache_chunks(n: int, chunk_tokens: int, width: int, device: torch.device) -> list[tuple[int, int]]:
    """``[lo, hi)`` row ranges of a fused LM head over ``n`` rows with ``width`` output columns.

    On GPU: ``chunk_tokens`` rows each (the last one shorter). On CPU: cache-sized chunks of at most
    :data:`CPU_CHUNK_BYTES` of fp32 logits and :data:`CPU_MAX_CHUNK_ROWS` rows (at least
    :data:`CPU_MIN_CHUNK_ROWS` rows, at most ``chunk_tokens``), and a short tail joins the chunk
    before it, so that every row's logits have the same bits as in one matmul over all ``n`` rows. Same ranges on every rank for the same
    ``(n, width)`` (collectives inside a chunk stay matched)."""
    step = max(1, chunk_tokens)
    if device.type == "cpu":
        step = min(step, CPU_MAX_CHUNK_ROWS, max(CPU_MIN_CHUNK_ROWS, CPU_CHUNK_BYTES // (4 * max(width, 1))))
    bounds = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
    if device.type == "cpu" and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < _MIN_TAIL_ROWS:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds
