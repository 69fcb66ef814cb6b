"""probe_gemm_shapes: host time of the first F.linear call at each row count (the engine's GEMM shapes).

    python scripts/probe_gemm_shapes.py --rows 8100:8460 [--shapes 4608x4096,4096x4096,27392x4096,4096x13696]

cuBLAS's first call at some new row counts takes milliseconds on the host, and on a busy GPU it waits for the work
queued before it (what FastRunner.warm_gemms runs ahead of serving). Prints, per weight shape, the row counts whose
first call took over --slow-ms, with the second call's time. Run it with CUDA_MODULE_LOADING=EAGER to compare (on an
H100 the same calls stayed slow).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="8192:8448", help="START:END row counts")
    ap.add_argument("--shapes", default="4608x4096,4096x4096,27392x4096,4096x13696",
                    help="OUTxIN weight shapes (ChatGLM3-6B: qkv, o, gate+up, down)")
    ap.add_argument("--slow-ms", type=float, default=2.0)
    a = ap.parse_args()
    lo, hi = (int(x) for x in a.rows.split(":"))
    t = time.perf_counter()
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    print(f"CUDA_MODULE_LOADING={os.environ.get('CUDA_MODULE_LOADING', '(unset: lazy)')}: context "
          f"{time.perf_counter() - t:.2f} s, {(lambda f, tot: (tot - f) / 2**30)(*torch.cuda.mem_get_info()):.2f} GiB in use")
    for shape in a.shapes.split(","):
        out, inp = (int(x) for x in shape.split("x"))
        w = torch.randn(out, inp, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(hi, inp, device="cuda", dtype=torch.bfloat16)
        slow = []
        for m in range(lo, hi):
            torch.cuda.synchronize()
            t = time.perf_counter()
            F.linear(x[:m], w)
            first = (time.perf_counter() - t) * 1e3
            torch.cuda.synchronize()
            if first > a.slow_ms:
                t = time.perf_counter()
                F.linear(x[:m], w)
                slow.append((m, round(first, 1), round((time.perf_counter() - t) * 1e3, 2)))
        print(f"{shape}: {len(slow)} of {hi - lo} row counts took > {a.slow_ms} ms on their first call "
              f"(rows, first ms, second ms): {slow[:40]}")


if __name__ == "__main__":
    main()
