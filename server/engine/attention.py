"""attention: write K/V into the paged cache and attend over it.

Cache of one layer: (2, num_blocks, block_size, kv_heads, head_dim); a sequence's tokens live in the blocks its
block table lists, in order. Two shapes of batch:
- decode: one query token per sequence; block_tables (B, W) and context_lens (B,) are tensors, so the step can
  be captured in a CUDA graph. On CUDA a Triton kernel (`triton_attention.py`) reads the blocks in place
  (split over the context, flash-decoding style); elsewhere the blocks are gathered and fed to SDPA.
- prefill: a chunk of query tokens per sequence that may continue cached context (prefix hits, chunked
  prefill); one SDPA call per sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillSeq:
    q_start: int               # first row of this sequence's tokens in the flat batch
    q_len: int
    ctx_start: int             # tokens already in the cache before this chunk
    block_table: torch.Tensor  # (n_blocks,) int, on the cache's device


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor                  # (T,) flat cache slot for each token's K/V
    decode: bool
    block_tables: torch.Tensor | None = None    # decode: (B, W) int32
    context_lens: torch.Tensor | None = None    # decode: (B,) int32, the new token included
    prefill: list[PrefillSeq] = field(default_factory=list)
    use_triton: bool = False
    num_splits: int = 1                         # decode on Triton: context partitions per (seq, kv head)


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    kv_heads, head_dim = k.shape[1], k.shape[2]
    cache[0].view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
    cache[1].view(-1, kv_heads, head_dim).index_copy_(0, slots, v)


def decode_attention_torch(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor) -> torch.Tensor:
    """q: (B, H, D) -> (B, H, D); gathers each sequence's blocks (reference path, and the CPU path)."""
    b, w = block_tables.shape
    bs, kv_heads, d = cache.shape[2], cache.shape[3], cache.shape[4]
    k = cache[0][block_tables.long()].view(b, w * bs, kv_heads, d).transpose(1, 2)   # (B, kvh, L, D)
    v = cache[1][block_tables.long()].view(b, w * bs, kv_heads, d).transpose(1, 2)
    mask = torch.arange(w * bs, device=q.device)[None, :] < context_lens[:, None]    # (B, L)
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :],
                                         enable_gqa=kv_heads != q.shape[1])
    return out[:, :, 0, :]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                      seqs: list[PrefillSeq]) -> torch.Tensor:
    """q: (T, H, D), k/v: (T, kvh, D) of this chunk (already written to the cache) -> (T, H, D)."""
    out = torch.empty_like(q)
    bs, kv_heads, d = cache.shape[2], cache.shape[3], cache.shape[4]
    gqa = kv_heads != q.shape[1]
    for s in seqs:
        rows = slice(s.q_start, s.q_start + s.q_len)
        qi = q[rows].transpose(0, 1)[None]                                    # (1, H, n, D)
        if s.ctx_start == 0:
            ki, vi = k[rows].transpose(0, 1)[None], v[rows].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=gqa)
        else:
            ctx = s.ctx_start + s.q_len
            blocks = s.block_table[: (ctx + bs - 1) // bs].long()
            ki = cache[0][blocks].reshape(-1, kv_heads, d)[:ctx].transpose(0, 1)[None]
            vi = cache[1][blocks].reshape(-1, kv_heads, d)[:ctx].transpose(0, 1)[None]
            q_pos = torch.arange(s.ctx_start, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]    # (n, ctx)
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask[None, None], enable_gqa=gqa)
        out[rows] = o[0].transpose(0, 1)
    return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
           meta: AttentionMetadata) -> torch.Tensor:
    """Attention of this batch's queries over the cache (its own K/V already written there)."""
    if not meta.decode:
        return prefill_attention(q, k, v, cache, meta.prefill)
    if meta.use_triton:
        from .triton_attention import paged_decode
        return paged_decode(q, cache, meta.block_tables, meta.context_lens, meta.num_splits)
    return decode_attention_torch(q, cache, meta.block_tables, meta.context_lens)
