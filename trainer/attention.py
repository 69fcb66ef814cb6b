"""attention: causal attention for training without a mask tensor (config key `attention: varlen`).

Packed rows (trainer/collate.py) carry each example's start as `cu_seq_lens_q`; right-padded rows need no mask
at all, since under causality a real token only sees tokens before it and padding comes after. So one
variable-length causal kernel serves both: on CUDA PyTorch's own FlashAttention-2 varlen op (the one its nested
tensors use; it has a backward and takes grouped KV heads), elsewhere (CPU, fp32, pre-Ampere cards) SDPA one
example at a time.

Why not transformers' built-ins: `sdpa` turns a packed row into a (tokens x tokens) mask — attention over the whole
row, quadratic in the batch's tokens — and `flash_attention_2` needs the flash-attn package, which has no wheel
for current torch/CUDA to install offline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lawchat_server.engine.attention import flash_ok    # one check for both varlen callers

NAME = "lawchat_varlen"


def row_starts(batch: int, length: int, device) -> torch.Tensor:
    """Each padded row as one sequence: [0, T, 2T, ..., B*T] (int32)."""
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)


def varlen_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, max_length_q=None, **_):
    """transformers attention interface. query (B, H, T, D), key/value (B, Hkv, T, D) -> (B, T, H, D), None."""
    if attention_mask is not None:
        raise ValueError("varlen attention takes no mask (it is registered without a mask function)")
    b, h, t, d = query.shape
    if cu_seq_lens_q is None:
        cu, max_len = row_starts(b, t, query.device), t
    else:
        if b != 1:
            raise ValueError("cu_seq_lens_q is for one packed row")
        cu, max_len = cu_seq_lens_q.to(torch.int32), int(max_length_q or t)
    q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value))   # (B*T, heads, D)
    p = dropout if module.training else 0.0
    if flash_ok(q):
        out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, p, True, False,
                                                      scale=scaling)[0]
    else:
        out = torch.empty_like(q)
        bounds = cu.tolist()
        for s, e in zip(bounds[:-1], bounds[1:]):
            out[s:e] = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                                      v[s:e].transpose(0, 1), dropout_p=p, is_causal=True,
                                                      scale=scaling, enable_gqa=True).transpose(0, 1)
    return out.view(b, t, h, d), None


def register() -> str:
    """Make `attn_implementation=NAME` known to transformers (no mask function: none is built)."""
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, varlen_attention)
    return NAME
