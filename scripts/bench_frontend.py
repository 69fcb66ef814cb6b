"""bench_frontend: how many tokens/s the gRPC front end streams when the model costs nothing.

    python scripts/bench_frontend.py [--streams 1,16,64] [--tokens 2000]
    python scripts/bench_frontend.py --engine runs/demo/merged --step-ms 7 --streams 64,256 --tokens 256

Default: an instant fake engine (one character per token) behind the real ChatService on loopback; client
threads in other processes read the streams: the ceiling the Python front end puts on any engine.
--engine TOKENIZER_DIR: the real Engine (scheduler, block manager, output thread, detokenizer) with a runner
that has no model and sleeps --step-ms per step (the GIL is free meanwhile, as during a GPU step): what the
host side costs per token on top of a GPU step of that length.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import time

from lawchat_server.app import ThreadedServer
from lawchat_server.config import ServerConfig
from lawchat_server.engine.engine import Chunk, EngineStats


class InstantEngine:
    """Engine face with no model: every token is ready at once, handed over in steps of `step` tokens."""

    device, dtype, max_len, running, waiting = "cpu", "none", 1 << 20, 0, 0

    def __init__(self, step: int = 1):
        self.step = step

    def encode_chat(self, messages):
        return [1] * 8

    def start(self):
        pass

    def stop(self):
        pass

    def stats(self):
        return EngineStats(0, 0, 0, 0, 1, 0, 0, 0, 0)

    async def stream(self, request, stall_seconds=None):
        n = request.max_new_tokens
        for i in range(self.step, n + 1, self.step):
            done = i >= n
            yield Chunk("法" * self.step, "max_tokens" if done else None, 8, i)
            await asyncio.sleep(0)


class SleepingRunner:
    """A runner with a real tokenizer and no model: each step sleeps, then every sequence gets one character."""

    path, attention_backend, dtype, device = "none", "none", "none", "cpu"
    graph_batch_sizes: list = []

    def __init__(self, tokenizer_dir: str, step_s: float, max_num_seqs: int):
        from transformers import AutoTokenizer

        from lawchat_server.engine.config import EngineConfig
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.config = EngineConfig(max_num_seqs=max_num_seqs, max_waiting=4096, enable_prefix_caching=False)
        self.step_s, self.eos_ids, self.max_len = step_s, frozenset(), 1 << 16
        self.block_size, self.prefix_caching = 16, False
        self.num_blocks = max_num_seqs * 64 + 1
        self.token = next(i for i in range(len(self.tokenizer))
                          if len(self.tokenizer.decode([i], skip_special_tokens=True)) == 1
                          and "\u4e00" <= self.tokenizer.decode([i]) <= "\u9fff")

    def encode_chat(self, messages):
        from lawchat_server.prompt import encode_prompt
        return encode_prompt(self.tokenizer, messages)

    def release(self, seq) -> None:
        pass

    def execute(self, prefill, decode):
        time.sleep(self.step_s)
        sampled = [s for s, n in prefill if s.num_computed + n == len(s)] + decode
        return sampled, [self.token] * len(sampled)


def reader(target: str, streams: int, tokens: int, out) -> None:
    import threading

    from lawchat_client import LawchatClient
    got = []

    def one():
        with LawchatClient(target, timeout=120) as c:
            s = c.chat_stream("问", max_new_tokens=tokens, ignore_eos=True)
            text = "".join(s)
            got.append(len(text))
    ths = [threading.Thread(target=one) for _ in range(streams)]
    t0 = time.time()
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    out.put((sum(got), t0, time.time()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", default="1,16,64")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--engine", default=None, help="tokenizer dir: the real Engine with a sleeping runner")
    ap.add_argument("--step-ms", type=float, default=7.0)
    a = ap.parse_args()
    streams = [int(s) for s in a.streams.split(",")]
    print("| streams | tokens/message | tokens/s | messages/s |\n|---|---|---|---|")
    if a.engine:
        from lawchat_server.engine.engine import Engine
        engines = [("engine", Engine(SleepingRunner(a.engine, a.step_ms / 1e3, max(streams))))]
    else:
        engines = [(step, InstantEngine(step)) for step in (1, 4)]
    for step, engine in engines:
        srv = ThreadedServer(engine, ServerConfig(port=0))
        try:
            for n in streams:
                ctx = mp.get_context("spawn")
                q = ctx.Queue()
                per = [n // a.processes + (i < n % a.processes) for i in range(min(n, a.processes))]
                procs = [ctx.Process(target=reader, args=(srv.target, k, a.tokens, q)) for k in per if k]
                for p in procs:
                    p.start()
                res = [q.get(timeout=600) for _ in procs]
                total = sum(r[0] for r in res)
                wall = max(r[2] for r in res) - min(r[1] for r in res)
                for p in procs:
                    p.join()
                msgs = f"{total / step / wall:.0f}" if step != "engine" else "-"
                print(f"| {n} | {step} | {total / wall:.0f} | {msgs} |", flush=True)
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
