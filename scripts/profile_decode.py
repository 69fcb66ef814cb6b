"""profile_decode: where one eager decode step's GPU time goes (torch.profiler), batch 1 and 64.

    python scripts/profile_decode.py --random-glm6b /tmp/glm6b --tokenizer runs/demo/merged

Prints the CUDA kernels by total time and how much of the step is GEMM vs everything else, next to the
graph-replayed step time; what the fast path would gain from fusing the small ops.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lawchat_server.engine.config import EngineConfig
from lawchat_server.engine.model_runner import load_runner
from lawchat_server.engine.sampler import SamplingParams
from lawchat_server.engine.sequence import Sequence


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--random-glm6b", type=Path, default=Path("/tmp/glm6b"))
    ap.add_argument("--tokenizer", type=Path, required=True)
    a = ap.parse_args()
    if not (a.random_glm6b / "config.json").is_file():
        from lawchat_trainer.random_model import make_random_model
        make_random_model(a.random_glm6b, a.tokenizer, device="cuda")
    runner = load_runner(a.random_glm6b, device="cuda", config=EngineConfig(max_num_seqs=256))
    print(torch.cuda.get_device_name(), "| 128-token context, greedy")
    from lawchat_server.engine import triton_ops
    print("| fused ops | batch | graph step ms (incl. sample + sync) | tok/s | eager kernels | GPU ms | GEMM ms |")
    print("|---|---|---|---|---|---|---|")
    tables = []
    for fused in (False, True):
        runner.model.fused = triton_ops if fused else None
        runner.graphs = {}
        runner._capture_graphs()
        for b in (1, 64, 256):
            seqs = make_batch(b)
            for _ in range(3):
                runner.execute([], seqs)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                runner.execute([], seqs)
            graph_ms = (time.perf_counter() - t0) / 20 * 1e3
            graphs, runner.graph_batch_sizes = runner.graph_batch_sizes, []     # eager, to see each kernel
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                runner.execute([], seqs)
                torch.cuda.synchronize()
            runner.graph_batch_sizes = graphs
            ev = [e for e in prof.key_averages() if e.device_time_total > 0]
            total = sum(e.device_time_total for e in ev)
            gemm = sum(e.device_time_total for e in ev
                       if any(k in e.key.lower() for k in ("gemm", "gemv", "cutlass", "sm90", "nvjet")))
            print(f"| {fused} | {b} | {graph_ms:.2f} | {b * 1e3 / graph_ms:.0f} | {sum(e.count for e in ev)} | "
                  f"{total / 1e3:.2f} | {gemm / 1e3:.2f} |", flush=True)
            if fused and b in (1, 256):
                tables.append((b, prof.key_averages().table(sort_by="device_time_total", row_limit=10,
                                                            max_name_column_width=50)))
    for b, table in tables:
        print(f"\nfused, batch {b}, kernels by GPU time:\n{table}")


def make_batch(b: int) -> list[Sequence]:
    """b sequences of 128 computed tokens (9 blocks each), one pending token: a decode step."""
    seqs = []
    for i in range(b):
        s = Sequence(list(range(100, 228)), SamplingParams(), 10, seed=i)
        s.block_table = list(range(1 + i * 9, 1 + (i + 1) * 9))
        s.num_computed = 128
        s.token_ids.append(5)
        seqs.append(s)
    return seqs

if __name__ == "__main__":
    main()
