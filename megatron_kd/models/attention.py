"""Causal core attention on ``torch.nn.functional.scaled_dot_product_attention``.

Used in the local (Transformer-Engine-free) layer spec: megatron-core's stock
``DotProductAttention`` takes its score buffer from a CUDA memory pool and builds the full
[b, h, s, s] score matrix, while SDPA picks flash / memory-efficient kernels on GPU and a fused
kernel on CPU. Handles GQA natively and the incremental-decoding case (fewer queries than keys).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    """Drop-in ``core_attention`` for megatron-core's ``SelfAttention`` (causal masks only)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, **kwargs):
        super().__init__(config=config)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.scale = softmax_scale or config.softmax_scale or 1.0 / math.sqrt(head_dim)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        """q: [sq, b, h, d]; k, v: [sk, b, g, d] (g divides h) -> [sq, b, h*d]."""
        sq, b, h, d = query.shape
        sk = key.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        dropout = self.dropout_p if self.training else 0.0
        gqa = k.shape[1] != h
        if sq == sk:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                                 scale=self.scale, enable_gqa=gqa)
        else:
            # Incremental decoding: query i sits at absolute position sk - sq + i.
            qpos = torch.arange(sk - sq, sk, device=q.device)[:, None]
            mask = qpos >= torch.arange(sk, device=q.device)[None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 scale=self.scale, enable_gqa=gqa)
        return out.permute(2, 0, 1, 3).reshape(sq, b, h * d)
