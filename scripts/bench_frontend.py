"""bench_frontend: how many tokens/s the gRPC front end streams when the engine costs nothing.

    python scripts/bench_frontend.py [--streams 1,16,64] [--tokens 2000]

An instant fake engine (one character per token, no model) behind the real ChatService on loopback; client
threads in other processes read the streams. This is the ceiling the Python front end puts on any engine.
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

    async def stream(self, request):
        n = request.max_new_tokens
        for i in range(self.step, n + 1, self.step):
            done = i >= n
            yield Chunk("法" * self.step, "max_tokens" if done else None, 8, i)
            await asyncio.sleep(0)


def reader(target: str, streams: int, tokens: int, out) -> None:
    import threading

    from lawchat_client import LawchatClient
    got = []

    def one():
        with LawchatClient(target, timeout=120) as c:
            s = c.chat_stream("问", max_new_tokens=tokens)
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
    a = ap.parse_args()
    print("| streams | tokens/message | tokens/s | messages/s |\n|---|---|---|---|")
    for step in (1, 4):
        srv = ThreadedServer(InstantEngine(step), ServerConfig(port=0))
        try:
            for n in [int(s) for s in a.streams.split(",")]:
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
                print(f"| {n} | {step} | {total / wall:.0f} | {total / step / wall:.0f} |", flush=True)
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
