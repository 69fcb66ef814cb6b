"""triton_lora: batched gather matrix-vector LoRA (BGMV, as Punica names it) for decode rows on CUDA.

Each row of a decode batch may use another adapter: row i adds (x_i A[s_i]^T) B[s_i]^T to its projection output,
s_i its slot (-1: none, the row is skipped). Two kernels with the slot index as a device tensor, so the captured
CUDA graphs serve any mix of adapters without a Python loop over them:
- shrink: partial sums of t_i = x_i A[s_i]^T, grid (rows, rank blocks, input splits): enough programs to keep the
  card's memory busy at batch 1, each split's sums stored apart (no zeroed buffer, no atomics);
- expand: y_i += (sum over splits of t_i) B[s_i]^T, grid (rows, output blocks), in place.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R = 16
BLOCK_K = 512
K_SPLIT = 1024          # input features per shrink program
BLOCK_N = 128


@triton.jit
def _shrink(X, A, IDX, T, K, R, s_x, s_as, s_ar, s_t, s_ts, K_PER, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    slot = tl.load(IDX + row).to(tl.int64)
    if slot < 0:
        return
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(split * K_PER, split * K_PER + K_PER, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        x = tl.load(X + row.to(tl.int64) * s_x + k, mask=km, other=0.0).to(tl.float32)
        a = tl.load(A + slot * s_as + r[:, None] * s_ar + k[None, :], mask=(r[:, None] < R) & km[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
    tl.store(T + row * s_t + split * s_ts + r, acc, mask=r < R)


@triton.jit
def _expand(T, B, IDX, Y, N, R, s_t, s_ts, SPLITS, s_bs, s_bn, s_y, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    row = tl.program_id(0)
    slot = tl.load(IDX + row).to(tl.int64)
    if slot < 0:
        return
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, BLOCK_R)
    t = tl.zeros([BLOCK_R], dtype=tl.float32)
    for sp in range(0, SPLITS):
        t += tl.load(T + row * s_t + sp * s_ts + r, mask=r < R, other=0.0)
    b = tl.load(B + slot * s_bs + n[:, None] * s_bn + r[None, :], mask=(n[:, None] < N) & (r[None, :] < R),
                other=0.0).to(tl.float32)
    d = tl.sum(b * t[None, :], axis=1)
    y_ptr = Y + row.to(tl.int64) * s_y + n
    y = tl.load(y_ptr, mask=n < N, other=0.0)
    tl.store(y_ptr, (y.to(tl.float32) + d).to(y.dtype), mask=n < N)


def bgmv(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, idx: torch.Tensor, y: torch.Tensor) -> None:
    """y (M, N) += rows' (x A[idx]^T) B[idx]^T; x (M, K), A (S, R, K), B (S, N, R) contiguous, idx (M,) int32."""
    m, k = x.shape
    r, n = A.shape[1], B.shape[1]
    k_per = min(K_SPLIT, triton.cdiv(k, BLOCK_K) * BLOCK_K)
    splits = triton.cdiv(k, k_per)
    t = torch.empty(m, splits, r, dtype=torch.float32, device=x.device)   # rows without an adapter leave it unread
    _shrink[(m, triton.cdiv(r, BLOCK_R), splits)](x, A, idx, t, k, r, x.stride(0), A.stride(0), A.stride(1),
                                                  t.stride(0), t.stride(1), k_per, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K)
    _expand[(m, triton.cdiv(n, BLOCK_N))](t, B, idx, y, n, r, t.stride(0), t.stride(1), splits, B.stride(0),
                                          B.stride(1), y.stride(0), BLOCK_N=BLOCK_N, BLOCK_R=triton.next_power_of_2(r))
