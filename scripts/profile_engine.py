"""profile_engine: the engine alone (no gRPC), N streams at once, and how busy the GPU is during its decode steps.

    python scripts/profile_engine.py --random-glm6b /tmp/glm6b --tokenizer runs/gpu-tok --streams 256

Runs the Engine in this process (scheduler, runner, output thread, detokenizer; CUDA graphs, overlap) on random
prompts, its chunks sent out through the engine process's pipe sink, with a torch.profiler window of --window steps
once every stream decodes (server/engine/profiling.py; a served engine process logs the same window with
LAWCHAT_PROFILE_STEPS=N@R). Prints the round (tok/s, step time), the engine thread's split per step, and for the
window: GPU busy time (union of kernel intervals) against the wall time, the largest gaps between kernels and the
kernels by GPU time. --no-overlap shows the overlap's share; --tiny --device cpu is a smoke run without a GPU.
"""
from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from lawchat_server.engine.config import EngineConfig
from lawchat_server.engine.engine import Engine, GenerationRequest
from lawchat_server.engine.engine_process import _PipeSink
from lawchat_server.engine.model_runner import load_runner
from lawchat_server.engine.profiling import profile_steps
from lawchat_server.engine.sampler import SamplingParams


def drain(conn) -> None:
    """The server's side of the engine pipe: read every message (and drop it)."""
    try:
        while True:
            conn.recv()
    except EOFError:
        pass


class TimedSink(_PipeSink):
    """The engine process's sink, noting when each request's first chunk leaves and when all have finished."""

    def __init__(self, conn, engine, jobs: dict, n: int, on_all_first=None):
        super().__init__(conn, engine, jobs)
        self.n, self.on_all_first = n, on_all_first
        self.t0 = time.perf_counter()
        self.firsts: list[float] = []
        self.seen: set[int] = set()
        self.done = threading.Event()

    def deliver(self, items: list) -> None:
        now = time.perf_counter()
        for rid, _ in items:
            if rid not in self.seen:
                self.seen.add(rid)
                self.firsts.append(now - self.t0)
                if len(self.firsts) == self.n and self.on_all_first:
                    self.on_all_first()
        super().deliver(items)
        if not self.jobs:
            self.done.set()


class LaunchProfile:
    """Wraps runner.launch: cProfile over every launch of a round, and the slow launches (> 40 ms) with their
    step's shape."""

    def __init__(self, runner):
        import cProfile
        self.cprofile, self.runner, self.orig = cProfile, runner, runner.launch
        runner.launch = self.launch
        self.reset()

    def reset(self) -> None:
        self.prof, self.slow = self.cprofile.Profile(), []

    def launch(self, prefill, decode):
        t = time.perf_counter()
        self.prof.enable()
        try:
            return self.orig(prefill, decode)
        finally:
            self.prof.disable()
            ms = (time.perf_counter() - t) * 1e3
            if ms > 40:
                self.slow.append((round(ms), sum(n for _, n in prefill), len(decode)))

    def report(self) -> str:
        import io
        import pstats
        out = io.StringIO()
        pstats.Stats(self.prof, stream=out).sort_stats("tottime").print_stats(14)
        body = "\n".join(ln for ln in out.getvalue().splitlines() if ln.strip())
        return f"  slow launches (ms, prompt tokens, decode rows): {self.slow}\n{body}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--random-glm6b", type=Path, default=Path("/tmp/glm6b"))
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--streams", default="256", help="streams of each round shape, e.g. 64,256")
    ap.add_argument("--prompt-tokens", default="128", help="prompt tokens of each shape, e.g. 900,128 (one: all)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--window", type=int, default=30, help="decode steps in the profiler window (0: no profiled round)")
    ap.add_argument("--profile-launch", action="store_true",
                    help="cProfile the runner's launches of each round: the functions that took the host time, and "
                         "the launches over 40 ms (a first round's one-time costs show against the next round's)")
    ap.add_argument("--sync-debug", action="store_true",
                    help="torch.cuda.set_sync_debug_mode('warn') for the rounds: each op that waits for the GPU warns")
    ap.add_argument("--rounds", type=int, default=1, help="unprofiled rounds (new prompts each)")
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval (s; Python's default 0.005)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model of the same family (a smoke test on CPU)")
    a = ap.parse_args()
    streams = [int(x) for x in a.streams.split(",")]
    lengths = [int(x) for x in a.prompt_tokens.split(",")]
    shapes = list(zip(streams, lengths * len(streams) if len(lengths) == 1 else lengths, strict=True))
    if a.switch_interval:
        sys.setswitchinterval(a.switch_interval)
    if not (a.random_glm6b / "config.json").is_file():
        from lawchat_trainer.random_model import GLM6B, make_random_model
        shape = dict(GLM6B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     head_dim=16) if a.tiny else None
        make_random_model(a.random_glm6b, a.tokenizer, shape=shape, device=a.device)
    cfg = EngineConfig(max_num_seqs=max(streams), max_waiting=4 * max(streams), overlap=not a.no_overlap)
    t_load = time.perf_counter()
    runner = load_runner(a.random_glm6b, device=a.device, config=cfg)
    engine = Engine(runner, cfg)
    launches = LaunchProfile(runner) if a.profile_launch else None
    engine.start()
    t_warm = time.perf_counter()
    engine.warmup()
    used = ""
    if a.device == "cuda":
        free, total = torch.cuda.mem_get_info()
        used = f", GPU memory in use {(total - free) / 2**30:.1f} GiB"
    print(f"start: load {t_warm - t_load:.1f} s, warm-up {time.perf_counter() - t_warm:.1f} s{used}", flush=True)
    rng = random.Random(1)

    def requests(n: int, length: int) -> list[GenerationRequest]:
        return [GenerationRequest([rng.randrange(100, 30000) for _ in range(length)], SamplingParams(),
                                  a.new_tokens, ignore_eos=True) for _ in range(n)]

    ctx = multiprocessing.get_context("spawn")
    pipe_out, pipe_in = ctx.Pipe(duplex=False)
    drainer = ctx.Process(target=drain, args=(pipe_out,), daemon=True)
    drainer.start()

    def run(reqs, on_all_decoding=None) -> list[float]:
        """reqs through the engine as the engine process serves them: chunks go out through its pipe sink (one
        pickled message a step, read by another process), so the engine's threads do the work they do served."""
        sink = TimedSink(pipe_in, engine, {}, len(reqs), on_all_decoding)
        for rid, r in enumerate(reqs):
            sink.jobs[rid] = engine.submit(r, sink, rid)
        sink.done.wait()
        return sink.firsts

    run(requests(min(streams[0], 16), shapes[0][1]))        # warm: connections of the loop, shapes
    if a.sync_debug:
        torch.cuda.set_sync_debug_mode("warn")
    plan = [(f"round {i + 1}", False) for i in range(a.rounds)] + ([("profiled round", True)] if a.window else [])
    for (n_streams, length), (name, prof_on) in ((shape, p) for shape in shapes for p in plan):
        steps0, timing0, alloc0 = engine._steps, dict(engine.timing), runner.allocator_counters()
        window: list[str] = []

        def start_window():
            if prof_on:
                threading.Thread(target=lambda: window.append(profile_steps(engine, a.window, a.device == "cuda")),
                                 daemon=True).start()
        if launches:
            launches.reset()
        t0 = time.perf_counter()
        firsts = run(requests(n_streams, length), start_window)
        wall = time.perf_counter() - t0
        steps = engine._steps - steps0
        tm = {k: (engine.timing[k] - timing0[k]) / steps * 1e3 for k in engine.timing}
        print(f"\n{name}: {n_streams} streams x {length}-token prompts, {a.new_tokens} new tokens, overlap "
              f"{not a.no_overlap}: {n_streams * a.new_tokens / wall:.0f} tok/s, {wall * 1e3:.0f} ms, {steps} steps; "
              f"TTFT p50 {statistics.median(firsts) * 1e3:.0f} / max {max(firsts) * 1e3:.0f} ms; engine thread a step: "
              + ", ".join(f"{k} {v:.2f}" for k, v in tm.items()) + " ms; allocator: "
              + (", ".join(f"{k} +{v - alloc0[k]}" for k, v in runner.allocator_counters().items()) or "-"))
        if launches:
            print(launches.report())
        if prof_on:
            while not window:
                time.sleep(0.05)
            print(window[0])
    engine.stop()


if __name__ == "__main__":
    main()
