"""bench_gemm: the decode step's GEMMs alone (cuBLAS through F.linear, bf16), at the rows a decode step has.

    python scripts/bench_gemm.py [--rows 1,64,128,256,512]          # ChatGLM3-6B's shapes (GLM6B)
    python scripts/bench_gemm.py --rows 128,256 --variants         # + transposed weights, cuBLASLt, Triton

Each GEMM is replayed from a CUDA graph, as the engine runs them. A decode step of 256 rows is compute-bound
(scripts/profile_engine.py: the GPU ~96% busy, GEMMs ~75% of it). This prints each GEMM's time and rate against two bounds measured in the same run: the card's bf16 matmul rate on 8192^3
products and its copy bandwidth reading the weight once; then the whole step's GEMMs (every layer and the LM head)
against the same bounds — how far cuBLAS is from the card at these shapes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import copy_bandwidth, matmul_rate  # noqa: E402


def shapes(cfg: dict) -> list[tuple[str, int, int, bool, int]]:
    """-> (name, in, out, bias, times a step) of the fast path's linear layers (fused qkv and gate+up)."""
    h, heads, kv, d = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    layers = cfg["num_hidden_layers"]
    return [("qkv", h, (heads + 2 * kv) * d, cfg.get("attention_bias", False), layers),
            ("o", heads * d, h, False, layers),
            ("gate+up", h, 2 * cfg["intermediate_size"], False, layers),
            ("down", cfg["intermediate_size"], h, False, layers),
            ("lm head", h, cfg["vocab_size"], False, 1)]


def time_graph(fn, reps: int = 50) -> float:
    """-> seconds one fn() takes, replayed from a CUDA graph of `reps` calls (no host launch cost)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (5 * reps)


def time_variants(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> dict[str, float]:
    wt = w.t().contiguous()                                     # (in, out)
    out = {"NN layout": time_graph(lambda: torch.addmm(b, x, wt) if b is not None else x @ wt)}
    prev = torch.backends.cuda.preferred_blas_library()
    try:
        torch.backends.cuda.preferred_blas_library("cublaslt")
        out["cuBLASLt"] = time_graph(lambda: F.linear(x, w, b))
    finally:
        torch.backends.cuda.preferred_blas_library(prev)
    from triton_gemm import linear
    y = linear(x, w, b)
    ref = F.linear(x, w, b)
    assert torch.allclose(y.float(), ref.float(), atol=2e-2, rtol=2e-2), (y - ref).abs().max()
    out["Triton"] = time_graph(lambda: linear(x, w, b))
    return out


def main() -> None:
    from lawchat_trainer.random_model import GLM6B
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,64,128,256,512")
    ap.add_argument("--variants", action="store_true",
                    help="also: the weight stored transposed (x @ W, NN), cuBLASLt preferred, an autotuned Triton GEMM")
    a = ap.parse_args()
    rate, bw = matmul_rate(), copy_bandwidth()
    print(f"card: {torch.cuda.get_device_name()} | torch {torch.__version__} | bf16 matmul {rate / 1e12:.0f} TFLOP/s "
          f"(8192^3) | copy bandwidth {bw / 1e12:.2f} TB/s")
    print("| GEMM | in -> out | rows | us | TFLOP/s | of the matmul rate | bound us (max of FLOPs, weight bytes) | "
          "vs bound |")
    print("|---|---|---|---|---|---|---|---|")
    step: dict[int | str, list[float]] = {}
    for name, n_in, n_out, bias, times in shapes(GLM6B):
        w = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) / n_in ** 0.5
        b = torch.zeros(n_out, device="cuda", dtype=torch.bfloat16) if bias else None
        for m in map(int, a.rows.split(",")):
            x = torch.randn(m, n_in, device="cuda", dtype=torch.bfloat16)
            t = time_graph(lambda: F.linear(x, w, b))         # as the engine runs them: replayed from a graph
            flops = 2 * m * n_in * n_out
            bound = max(flops / rate, 2 * n_in * n_out / bw)
            step.setdefault(m, [0.0, 0.0])
            step[m][0] += times * t
            step[m][1] += times * bound
            print(f"| {name} | {n_in} -> {n_out} | {m} | {t * 1e6:.1f} | {flops / t / 1e12:.0f} | {flops / t / rate:.2f} "
                  f"| {bound * 1e6:.1f} | {bound / t:.2f} |")
            if a.variants:
                for variant, tv in time_variants(x, w, b).items():
                    step.setdefault(f"{m}, {variant}", [0.0, 0.0])
                    step[f"{m}, {variant}"][0] += times * min(tv, t)
                    step[f"{m}, {variant}"][1] += times * bound
                    print(f"| {name}, {variant} | {n_in} -> {n_out} | {m} | {tv * 1e6:.1f} | {flops / tv / 1e12:.0f} | "
                          f"{flops / tv / rate:.2f} | {bound * 1e6:.1f} | {bound / tv:.2f} |")
        del w, b
    print("\n| rows (with a variant: the faster of it and cuBLAS per GEMM) | a decode step's GEMMs ms | bound ms | "
          "vs bound |")
    print("|---|---|---|---|")
    for m, (t, bound) in step.items():
        print(f"| {m} | {t * 1e3:.2f} | {bound * 1e3:.2f} | {bound / t:.2f} |")


if __name__ == "__main__":
    main()
