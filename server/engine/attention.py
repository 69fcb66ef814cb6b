"""attention: write K/V into the paged cache and attend over it.

Cache of one layer: (2, num_blocks, block_size, kv_heads, head_dim); a sequence's tokens live in the blocks its
block table lists, in order. A step's flat batch is its prefill rows first, then one row per decoding sequence:
- prefill: chunks of query tokens that may continue cached context (prefix hits, chunked prefill). All of the
  step's chunks go through one variable-length causal attention call per layer: their context K/V (cached prefix
  + the chunk just written) gathered into one packed tensor, and on CUDA PyTorch's FlashAttention-2 varlen op
  (causal mask aligned bottom-right, so a chunk's queries see the whole cached prefix); elsewhere SDPA per chunk.
- decode: one query per sequence; block_tables (B, W) and context_lens (B,) are tensors, so a decode-only step
  can be captured in a CUDA graph. On CUDA a Triton kernel (`triton_attention.py`) reads the blocks in place
  (split over the context, flash-decoding style); elsewhere the blocks are gathered and fed to SDPA.
A step that mixes both runs one forward pass: the linear layers see all rows, attention splits them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillBatch:
    """The step's prefill chunks as one variable-length batch (built once per step, shared by every layer)."""
    cu_q: torch.Tensor              # (S+1,) int32: chunk starts in the flat batch (device)
    cu_k: torch.Tensor              # (S+1,) int32: context starts in the packed K/V (device)
    max_q: int
    max_k: int
    kv_slots: torch.Tensor | None   # (Tk,) cache slot of each context token (prefix, then chunk), in order;
                                    # None when no chunk continues cached context: K/V are the chunk's own rows
    bounds: list[tuple[int, int, int, int]]   # host copy: (q_start, q_len, k_start, k_len) per chunk


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor                  # (T,) flat cache slot for each token's K/V
    prefill: PrefillBatch | None = None         # rows [0, num_prefill_tokens) are prefill chunks
    num_prefill_tokens: int = 0
    block_tables: torch.Tensor | None = None    # decode rows: (B, W) int32
    context_lens: torch.Tensor | None = None    # decode rows: (B,) int32, the new token included
    use_triton: bool = False
    num_splits: int = 1                         # decode on Triton: context partitions per (seq, kv head)


def flash_ok(q: torch.Tensor) -> bool:
    """PyTorch's FlashAttention-2 varlen op runs: CUDA, half precision, Ampere or newer."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(q.device)[0] >= 8)


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


def varlen_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pb: PrefillBatch) -> torch.Tensor:
    """q: (Tq, H, D) packed chunks, k/v: (Tk, kvh, D) packed contexts -> (Tq, H, D). Each chunk's queries are the
    last q_len positions of its context (causal mask aligned bottom-right)."""
    if flash_ok(q):
        return torch.ops.aten._flash_attention_forward(q, k, v, pb.cu_q, pb.cu_k, pb.max_q, pb.max_k, 0.0, True,
                                                       False)[0]
    out = torch.empty_like(q)
    gqa = k.shape[1] != q.shape[1]
    for qs, ql, ks, kl in pb.bounds:
        qi = q[qs:qs + ql].transpose(0, 1)[None]                              # (1, H, n, D)
        ki, vi = (x[ks:ks + kl].transpose(0, 1)[None] for x in (k, v))        # (1, kvh, ctx, D)
        if ql == kl:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=gqa)
        else:
            q_pos = torch.arange(kl - ql, kl, device=q.device)
            mask = torch.arange(kl, device=q.device)[None, :] <= q_pos[:, None]    # (n, ctx)
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask[None, None], enable_gqa=gqa)
        out[qs:qs + ql] = o[0].transpose(0, 1)
    return out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                      pb: PrefillBatch) -> torch.Tensor:
    """q: (T, H, D), k/v: (T, kvh, D) of this step's chunks (already written to the cache) -> (T, H, D)."""
    if pb.kv_slots is not None:      # some chunk continues cached context: read every context from the cache
        kv_heads, d = cache.shape[3], cache.shape[4]
        k = cache[0].view(-1, kv_heads, d).index_select(0, pb.kv_slots)
        v = cache[1].view(-1, kv_heads, d).index_select(0, pb.kv_slots)
    return varlen_causal(q, k, v, pb)


def decode_attention(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    if meta.use_triton:
        from .triton_attention import paged_decode
        return paged_decode(q, cache, meta.block_tables, meta.context_lens, meta.num_splits)
    return decode_attention_torch(q, cache, meta.block_tables, meta.context_lens)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
           meta: AttentionMetadata) -> torch.Tensor:
    """Attention of this batch's queries over the cache (its own K/V already written there)."""
    if meta.prefill is None:
        return decode_attention(q, cache, meta)
    n = meta.num_prefill_tokens
    out = prefill_attention(q[:n], k[:n], v[:n], cache, meta.prefill)
    if meta.block_tables is None:
        return out
    return torch.cat([out, decode_attention(q[n:], cache, meta)])
