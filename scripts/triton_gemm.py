"""triton_gemm: an autotuned Triton GEMM for y = x @ W^T (+ b), bf16 in, fp32 accumulation — an experiment for
scripts/bench_gemm.py --variants (whether kernels tuned per shape beat cuBLAS at a decode step's 128-256 rows)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP": 8}, num_stages=st, num_warps=wp)
           for bm, bn, bk, st, wp in [(64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (64, 128, 128, 3, 4),
                                      (128, 64, 64, 4, 4), (128, 128, 64, 4, 8), (128, 128, 64, 3, 4),
                                      (64, 256, 64, 3, 8), (128, 256, 64, 3, 8), (64, 64, 64, 6, 4),
                                      (128, 64, 128, 3, 4), (64, 32, 128, 5, 4), (128, 32, 128, 4, 4)]]


@triton.autotune(configs=CONFIGS, key=["M", "N", "K"])
@triton.jit
def _linear(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
            BK: tl.constexpr, GROUP: tl.constexpr):
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP * n_n)                     # GROUP row-tiles share the W tiles they read (L2)
    first_m = group * GROUP
    size = min(n_m - first_m, GROUP)
    pm = first_m + (pid % (GROUP * n_n)) % size
    pn = (pid % (GROUP * n_n)) // size
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    xp = x_ptr + rm[:, None] * K + rk[None, :]        # (BM, BK)
    wp = w_ptr + rn[None, :] * K + rk[:, None]        # (BK, BN): W is (N, K)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K, BK):
        acc = tl.dot(tl.load(xp, mask=rm[:, None] < M, other=0.0), tl.load(wp), acc)
        xp += BK
        wp += BK
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn)[None, :].to(tl.float32)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=rm[:, None] < M)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for x (M, K), w (N, K) with N and K multiples of 128."""
    (m, k), n = x.shape, w.shape[0]
    assert n % 256 == 0 and k % 128 == 0, (n, k)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)   # noqa: E731
    _linear[grid](x, w, b if b is not None else w, y, m, n, k, HAS_BIAS=b is not None)
    return y
