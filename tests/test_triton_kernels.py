"""The CUDA Triton kernels, run here by Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors, against the
torch ops of the CPU path: paged decode attention (GQA and MHA, ragged lengths, split context) and the fused
add+RMSNorm, rotary+KV write (GLM's interleaved partial rotary, Llama's halves) and SiLU*up.
scripts/gpu_check.py runs the same comparisons compiled on a GPU, in bf16.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="triton is in the dev extras (make setup installs it)")

CHECK = textwrap.dedent('''
    import torch
    from lawchat_server.engine import triton_ops
    from lawchat_server.engine.attention import decode_attention_torch, write_kv
    from lawchat_server.engine.model import ModelShape, add_rms_norm, apply_rotary, silu_mul
    from lawchat_server.engine.triton_attention import paged_decode

    torch.manual_seed(0)
    for heads, kvh, d in ((4, 2, 32), (8, 8, 16)):
        cache = torch.randn(2, 40, 16, kvh, d)
        lens = torch.tensor([1, 5, 16, 17, 100], dtype=torch.int32)
        tables = torch.randint(1, 40, (5, 7), dtype=torch.int32)
        q = torch.randn(5, heads, d)
        ref = decode_attention_torch(q, cache, tables, lens)
        for splits, pages in ((1, 1), (4, 1), (1, 4), (4, 4), (2, 8)):    # tiles of 1-8 blocks, past the end too
            err = (paged_decode(q, cache, tables, lens, splits, pages) - ref).abs().max().item()
            assert err < 1e-5, ("paged_decode", heads, kvh, splits, pages, err)

    x, r = torch.randn(3, 96), torch.randn(3, 96)
    w = torch.randn(96)
    for res in (None, r):
        y_ref, r_ref = add_rms_norm(x, None if res is None else res.clone(), w, 1e-5)
        y, r2 = triton_ops.add_rms_norm(x, None if res is None else res.clone(), w, 1e-5)
        assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(r2, r_ref), "add_rms_norm"
    gu = torch.randn(3, 2 * 300)
    assert torch.allclose(triton_ops.silu_mul(gu), silu_mul(gu), atol=1e-5), "silu_mul"

    for heads, kvh, d, rd, inter in ((4, 2, 32, 16, True), (4, 2, 32, 32, False), (2, 1, 16, 8, True),
                                     (10, 2, 16, 8, True), (12, 3, 16, 16, False)):   # heads over 8 programs
        shape = ModelShape(0, 0, 0, heads, kvh, d, 1e-5, rd, inter)
        t = 6
        qkv = torch.randn(t, (heads + 2 * kvh) * d)
        pos = torch.randint(0, 50, (t,))
        slots = torch.randperm(64)[:t]
        freqs = torch.outer(torch.arange(64).float(), torch.rand(rd // 2))
        cos, sin = freqs.cos(), freqs.sin()
        q, k, v = qkv.split([heads * d, kvh * d, kvh * d], dim=-1)
        q_ref = apply_rotary(q.reshape(t, heads, d), cos[pos], sin[pos], shape)
        k_ref = apply_rotary(k.reshape(t, kvh, d), cos[pos], sin[pos], shape)
        cache_ref = torch.zeros(2, 4, 16, kvh, d)
        write_kv(cache_ref, k_ref, v.reshape(t, kvh, d), slots)
        cache, qkv2 = torch.zeros_like(cache_ref), qkv.clone()
        triton_ops.rotary_write_kv(qkv2, pos, cos, sin, cache, slots, heads, kvh, d, rd, inter)
        assert torch.allclose(qkv2[:, :heads * d].view(t, heads, d), q_ref, atol=1e-5), ("rotary q", rd, inter)
        assert torch.allclose(cache, cache_ref, atol=1e-5), ("rotary cache", rd, inter)
    print("ok")
''')


BGMV_CHECK = textwrap.dedent('''
    import torch
    from lawchat_server.engine.triton_lora import bgmv

    torch.manual_seed(0)
    for k, n, r in ((96, 70, 8), (2500, 300, 48)):        # K over several splits and not a multiple, R over blocks
        A, B = torch.randn(3, r, k), torch.randn(3, n, r)
        x, y = torch.randn(5, k), torch.randn(5, n)
        idx = torch.tensor([2, -1, 0, 2, 1], dtype=torch.int32)      # -1: a row without an adapter
        ref = y.clone()
        for i, s in enumerate(idx.tolist()):
            if s >= 0:
                ref[i] += (x[i] @ A[s].T) @ B[s].T
        out = y.clone()
        bgmv(x, A, B, idx, out)
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, ("bgmv", k, n, r, err)
        assert torch.equal(out[1], y[1]), "a row without an adapter is left as it was"
    print("ok")
''')


def test_bgmv_lora_kernel_matches_per_row_matmuls_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", BGMV_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_triton_kernels_match_the_torch_ops_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
