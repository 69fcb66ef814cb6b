"""triton_ops: fused small ops of the decoder on CUDA (the torch versions in model.py run elsewhere).

Profiled on an H200 at batch 1 (scripts/profile_decode.py), the unfused step was 1,334 kernels: the GEMMs took
3.3 ms, ~1,250 small elementwise kernels another ~1.8 ms. These three kernels replace most of them:
- `add_rms_norm`: residual += x (in place) and y = RMSNorm(residual) in one pass;
- `rotary_write_kv`: rotary on q and k in place inside the fused QKV output, and k, v written to the paged cache;
- `silu_mul`: SwiGLU's silu(gate) * up.
Numerics follow HF's modules: the residual sum is rounded to the model dtype before it is normalised.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm(X, R, W, Y, n, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(X + row * n + cols, mask=mask, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(R + row * n + cols, mask=mask, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        tl.store(R + row * n + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)
    y = (xf * inv).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * n + cols, (w * y).to(Y.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """x: (T, n) contiguous. -> (y, residual): with a residual, residual += x first (in place) and y = norm of it."""
    t, n = x.shape
    y = torch.empty_like(x)
    _add_rms_norm[(t,)](x, residual if residual is not None else x, weight, y, n, eps,
                        HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n), num_warps=8)
    return y, (residual if residual is not None else x)


@triton.jit
def _rotary_write_kv(QKV, P, COS, SIN, KC, VC, SLOTS, s_qkv, H: tl.constexpr, KVH: tl.constexpr,
                     D: tl.constexpr, RD: tl.constexpr, INTERLEAVED: tl.constexpr, BH: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BH + tl.arange(0, BH)       # BH heads of the token: q heads, then k heads, then v heads
    d = tl.arange(0, D)
    base = QKV + t * s_qkv
    off = h[:, None] * D + d[None, :]                  # (BH, D)
    live = h < H + 2 * KVH
    x = tl.load(base + off, mask=live[:, None], other=0.0)
    slot = tl.load(SLOTS + t)
    pos = tl.load(P + t)
    half: tl.constexpr = RD // 2
    if INTERLEAVED:
        partner = d ^ 1
        f = d // 2
        sign = tl.where(d % 2 == 0, -1.0, 1.0)
    else:
        partner = tl.where(d < half, d + half, d - half)
        f = d % half
        sign = tl.where(d < half, -1.0, 1.0)
    rot_d = d < RD
    rot = (h < H + KVH)[:, None] & rot_d[None, :]      # q and k heads rotate their first RD dims
    xp = tl.load(base + h[:, None] * D + partner[None, :], mask=rot, other=0.0).to(tl.float32)
    c = tl.load(COS + pos * half + f, mask=rot_d, other=1.0).to(tl.float32)
    s = tl.load(SIN + pos * half + f, mask=rot_d, other=0.0).to(tl.float32)
    out = tl.where(rot, x.to(tl.float32) * c[None, :] + sign[None, :] * xp * s[None, :], x.to(tl.float32)).to(x.dtype)
    tl.debug_barrier()                                  # every lane has read its partner before anyone writes
    qk = (h < H + KVH)[:, None]
    tl.store(base + off, out, mask=qk)
    kv_off = slot * (KVH * D) + (h[:, None] - H) * D + d[None, :]
    tl.store(KC + kv_off, out, mask=qk & (h >= H)[:, None])
    tl.store(VC + kv_off - KVH * D, x, mask=((h >= H + KVH) & live)[:, None])


HEADS_A_PROGRAM = 8    # a program rotates 8 heads of one token (one head a program: 1-warp programs at ~1/3 of the
                       # copy bandwidth on an H100 for 8,100 prompt rows, 178 us a layer)


def rotary_write_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    cache: torch.Tensor, slots: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                    rotary_dim: int, interleaved: bool) -> None:
    """qkv: (T, (heads + 2 kv_heads) * head_dim) contiguous; rotated in place; k, v go to cache[:, slots]."""
    t = qkv.shape[0]
    bh = HEADS_A_PROGRAM
    _rotary_write_kv[(t, triton.cdiv(heads + 2 * kv_heads, bh))](
        qkv, positions, cos, sin, cache[0], cache[1], slots, qkv.stride(0),
        H=heads, KVH=kv_heads, D=head_dim, RD=rotary_dim, INTERLEAVED=interleaved, BH=bh, num_warps=4)


@triton.jit
def _silu_mul(GU, OUT, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(GU + row * 2 * n + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * 2 * n + n + cols, mask=mask, other=0.0)
    act = (g / (1.0 + tl.exp(-g))).to(u.dtype)        # silu in fp32, rounded like torch's, then * up
    tl.store(OUT + row * n + cols, (act.to(tl.float32) * u.to(tl.float32)).to(u.dtype), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: (T, 2n) = [gate | up] -> (T, n)."""
    t, n2 = gate_up.shape
    n = n2 // 2
    out = torch.empty(t, n, device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _silu_mul[(t, triton.cdiv(n, block))](gate_up, out, n, BLOCK=block, num_warps=4)
    return out
