"""triton_attention: paged decode attention on CUDA (one query token per sequence, GQA, split context).

Grid (batch, kv_head, split): each program loads the query heads of one KV group, walks its share of the
sequence's blocks, PAGES blocks a tile (measured on an H200: one 16-token block a load left the kernel at ~35% of
the card's bandwidth), with an online softmax, and writes a partial (max, sum, acc); `_reduce` merges the splits.
Splitting the context keeps the card busy at batch 1 (ChatGLM3 has only 2 KV heads). Shapes are fixed per
batch size, and block tables / lengths are read on the GPU, so the step captures in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["s_bt"])    # the block-table width varies per mixed step: one compile for all
def _decode_split(Q, Kc, Vc, BT, CL, Mid, MidML, scale,
                  s_qb, s_qh, s_kb, s_ks, s_kh, s_bt, s_mb, s_mh, s_ms,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
                  SPLITS: tl.constexpr, PAGES: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(CL + b)
    n_blocks = tl.cdiv(ctx, BLOCK)
    n_tiles = tl.cdiv(n_blocks, PAGES)                              # a tile: PAGES blocks, loaded together
    per_split = tl.cdiv(n_tiles, SPLITS)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_tiles)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    t = tl.arange(0, PAGES * BLOCK)                                 # token of the tile
    page, slot = t // BLOCK, t % BLOCK
    heads = kvh * GROUP + g
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=g[:, None] < GROUP, other=0.0)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for i in range(lo, hi):
        bi = i * PAGES + page                                       # (PAGES * BLOCK,) block index in the sequence
        blk = tl.load(BT + b * s_bt + bi, mask=bi < n_blocks, other=0).to(tl.int64)   # past the end: block 0
        off = blk[:, None] * s_kb + slot[:, None] * s_ks + kvh * s_kh + d[None, :]
        k = tl.load(Kc + off)                                       # (PAGES * BLOCK, D)
        v = tl.load(Vc + off)
        qk = tl.dot(q, tl.trans(k)) * scale                         # (GROUP_PAD, PAGES * BLOCK)
        pos = i * PAGES * BLOCK + t
        qk = tl.where(pos[None, :] < ctx, qk, float("-inf"))        # a tile holds >= 1 token of the context
        m_new = tl.maximum(m, tl.max(qk, 1))
        p = tl.exp(qk - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new

    base = b * s_mb + heads * s_mh + split * s_ms                   # (GROUP_PAD,)
    keep = g < GROUP
    tl.store(Mid + base[:, None] * D + d[None, :], acc, mask=keep[:, None])
    tl.store(MidML + base * 2, m, mask=keep)
    tl.store(MidML + base * 2 + 1, l, mask=keep)


@triton.jit
def _reduce(Mid, MidML, O, s_mb, s_mh, s_ms, s_ob, s_oh, SPLITS: tl.constexpr, D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    base = b * s_mb + h * s_mh + sp * s_ms
    m = tl.load(MidML + base * 2)
    l = tl.load(MidML + base * 2 + 1)
    acc = tl.load(Mid + base[:, None] * D + d[None, :])
    m_all = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_all), 0.0)         # empty splits weigh nothing
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(O + b * s_ob + h * s_oh + d, out.to(O.dtype.element_ty))


PAGES = 4     # KV blocks a program loads per iteration (64 tokens of 16-token blocks): larger loads in flight


def paged_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 num_splits: int, pages: int | None = None) -> torch.Tensor:
    """q: (B, H, D); cache: (2, blocks, block_size, kvh, D) -> (B, H, D)."""
    b, h, d = q.shape
    k, v = cache[0], cache[1]
    block, kvh = k.shape[1], k.shape[2]
    group = h // kvh
    mid = torch.empty(b, h, num_splits, d, device=q.device, dtype=torch.float32)
    mid_ml = torch.empty(b, h, num_splits, 2, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    _decode_split[(b, kvh, num_splits)](
        q, k, v, block_tables, context_lens, mid, mid_ml, d ** -0.5,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), block_tables.stride(0),
        h * num_splits, num_splits, 1,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK=block, D=d, SPLITS=num_splits,
        PAGES=pages or PAGES)
    _reduce[(b, h)](mid, mid_ml, out, h * num_splits, num_splits, 1, out.stride(0), out.stride(1),
                    SPLITS=num_splits, D=d)
    return out
