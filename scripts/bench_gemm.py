"""bench_gemm: the decode step's GEMMs alone (cuBLAS through F.linear, bf16), at the rows a decode step has.

    python scripts/bench_gemm.py [--rows 1,64,128,256,512]          # ChatGLM3-6B's shapes (GLM6B)

A decode step of 256 rows is compute-bound (scripts/profile_engine.py: the GPU ~96% busy, GEMMs ~80% of it). This
prints each GEMM's time and rate against two bounds measured in the same run: the card's bf16 matmul rate on 8192^3
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


def time_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, reps: int = 200) -> float:
    """-> seconds one F.linear takes (events around `reps` launches)."""
    for _ in range(10):
        F.linear(x, w, b)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        F.linear(x, w, b)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def main() -> None:
    from lawchat_trainer.random_model import GLM6B
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,64,128,256,512")
    a = ap.parse_args()
    rate, bw = matmul_rate(), copy_bandwidth()
    print(f"card: {torch.cuda.get_device_name()} | torch {torch.__version__} | bf16 matmul {rate / 1e12:.0f} TFLOP/s "
          f"(8192^3) | copy bandwidth {bw / 1e12:.2f} TB/s")
    print("| GEMM | in -> out | rows | us | TFLOP/s | of the matmul rate | bound us (max of FLOPs, weight bytes) | "
          "vs bound |")
    print("|---|---|---|---|---|---|---|---|")
    step: dict[int, list[float]] = {}
    for name, n_in, n_out, bias, times in shapes(GLM6B):
        w = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) / n_in ** 0.5
        b = torch.zeros(n_out, device="cuda", dtype=torch.bfloat16) if bias else None
        for m in map(int, a.rows.split(",")):
            x = torch.randn(m, n_in, device="cuda", dtype=torch.bfloat16)
            t = time_linear(x, w, b)
            flops = 2 * m * n_in * n_out
            bound = max(flops / rate, 2 * n_in * n_out / bw)
            step.setdefault(m, [0.0, 0.0])
            step[m][0] += times * t
            step[m][1] += times * bound
            print(f"| {name} | {n_in} -> {n_out} | {m} | {t * 1e6:.1f} | {flops / t / 1e12:.0f} | {flops / t / rate:.2f} "
                  f"| {bound * 1e6:.1f} | {bound / t:.2f} |")
        del w, b
    print("\n| rows | a decode step's GEMMs ms | bound ms | vs bound |")
    print("|---|---|---|---|")
    for m, (t, bound) in step.items():
        print(f"| {m} | {t * 1e3:.2f} | {bound * 1e3:.2f} | {bound / t:.2f} |")


if __name__ == "__main__":
    main()
