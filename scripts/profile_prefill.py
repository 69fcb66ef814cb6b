"""profile_prefill: where a step's time goes on the host and on the GPU, for the step shapes of real bursts.

    python scripts/profile_prefill.py --random-glm6b /tmp/glm6b --tokenizer runs/gpu-tok

Per shape (prefill chunks of 900-token prompts with and without decode rows, a burst of short prompts beside
256 decoding streams, decode-only steps): the host time of `runner.launch` (building inputs and enqueueing the
kernels, no sync), launch to ids on the host, the GPU time of the step's kernels (torch.profiler), the host
functions that take the launch's time (cProfile), and the top kernels.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lawchat_server.engine.config import EngineConfig
from lawchat_server.engine.model_runner import load_runner
from lawchat_server.engine.sampler import SamplingParams
from lawchat_server.engine.sequence import Sequence


class Blocks:
    """Hands out consecutive KV blocks (block 0 is the padding block)."""

    def __init__(self, block_size: int):
        self.bs, self.next = block_size, 1

    def take(self, n_tokens: int) -> list[int]:
        n = -(-n_tokens // self.bs)
        ids = list(range(self.next, self.next + n))
        self.next += n
        return ids


VOCAB = 30000     # ids drawn below this (set from the model)


def prefill_seq(blocks: Blocks, n: int, i: int) -> Sequence:
    s = Sequence([(i * 7919 + j * 31) % (VOCAB - 100) + 100 for j in range(n)], SamplingParams(), 10, seed=i)
    s.block_table = blocks.take(n + 1)
    return s


def decode_seq(blocks: Blocks, ctx: int, i: int) -> Sequence:
    s = prefill_seq(blocks, ctx, 10_000 + i)
    s.num_computed = ctx
    s.token_ids.append(5)
    s.block_table = s.block_table[: -(-(ctx + 1) // blocks.bs)] or s.block_table
    return s


def shapes(block_size: int, max_len: int) -> dict[str, tuple[list, list]]:
    b = Blocks(block_size)
    n, ctx = min(900, max_len - 120), min(1000, max_len - 20)      # a small model's max_len caps them (CPU smoke)
    return {
        f"9 x {n} prefill": ([(prefill_seq(b, n, i), n) for i in range(9)], []),
        f"9 x {n} prefill + 25 decode (ctx {ctx})": ([(prefill_seq(b, n, 100 + i), n) for i in range(9)],
                                                     [decode_seq(b, ctx, i) for i in range(25)]),
        "37 x 128 prefill + 89 decode (ctx 200)": ([(prefill_seq(b, 128, 200 + i), 128) for i in range(37)],
                                                    [decode_seq(b, 200, 100 + i) for i in range(89)]),
        f"64 decode (ctx {ctx})": ([], [decode_seq(b, ctx, 300 + i) for i in range(64)]),
        "256 decode (ctx 200)": ([], [decode_seq(b, 200, 400 + i) for i in range(256)]),
    }


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_once(runner, prefill, decode) -> tuple[float, float]:
    sync()
    t0 = time.perf_counter()
    handle = runner.launch(prefill, decode)
    t1 = time.perf_counter()
    handle.result()
    return t1 - t0, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--random-glm6b", type=Path, default=Path("/tmp/glm6b"))
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--model", type=Path, default=None, help="profile this model dir instead (CPU: a smoke run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--pages", default="", help="also: decode steps with the Triton kernel's PAGES at each of these "
                                                "(comma list; graphs re-captured)")
    a = ap.parse_args()
    model = a.model or a.random_glm6b
    if a.model is None and not (model / "config.json").is_file():
        from lawchat_trainer.random_model import make_random_model
        make_random_model(model, a.tokenizer, device=a.device)
    runner = load_runner(model, device=a.device, config=EngineConfig(max_num_seqs=256, num_kv_blocks=16384))
    global VOCAB
    VOCAB = min(VOCAB, runner.vocab_size)
    card = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    print(card, f"| {model} | torch {torch.__version__} | greedy")
    print("| step | launch (host) ms | launch -> ids ms | GPU kernels ms | kernels |")
    print("|---|---|---|---|---|")
    details = []
    for name, (prefill, decode) in shapes(runner.block_size, runner.max_len).items():
        for _ in range(3):
            run_once(runner, prefill, decode)
        times = sorted(run_once(runner, prefill, decode) for _ in range(10))
        launch = sorted(t[0] for t in times)[5] * 1e3
        total = sorted(t[1] for t in times)[5] * 1e3
        with profile(activities=[ProfilerActivity.CUDA] if a.device.startswith("cuda") else [ProfilerActivity.CPU]) as prof:
            run_once(runner, prefill, decode)
            sync()
        ev = [e for e in prof.key_averages() if e.device_time_total > 0]
        gpu = sum(e.device_time_total for e in ev) / 1e3
        print(f"| {name} | {launch:.2f} | {total:.2f} | {gpu:.2f} | {sum(e.count for e in ev)} |", flush=True)
        pr = cProfile.Profile()
        pr.enable()
        run_once(runner, prefill, decode)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(a.top)
        kernels = prof.key_averages().table(sort_by="device_time_total", row_limit=8, max_name_column_width=60)
        details.append(f"\n### {name}\nhost (cProfile, by own time):\n{s.getvalue()[-4000:]}\nkernels:\n{kernels}")
    for pages in [int(p) for p in a.pages.split(",") if p]:
        from lawchat_server.engine import triton_attention
        triton_attention.PAGES = pages
        runner.graphs = {}
        runner._capture_graphs()
        for name, (prefill, decode) in shapes(runner.block_size, runner.max_len).items():
            if prefill:
                continue
            for _ in range(3):
                run_once(runner, prefill, decode)
            total = sorted(run_once(runner, prefill, decode)[1] for _ in range(20))[10] * 1e3
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run_once(runner, prefill, decode)
                sync()
            attn = sum(e.device_time_total for e in prof.key_averages() if "decode_split" in e.key) / 1e3
            print(f"PAGES={pages} | {name} | launch -> ids {total:.2f} ms | attention kernels {attn:.3f} ms a step")
    print("".join(details))


if __name__ == "__main__":
    main()
