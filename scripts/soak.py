"""Soak test (outside CI): many concurrent streams against a real `lawchat serve` for minutes, clients cancelling
at random; prints lost streams, statuses by code, latency quantiles and the server's RSS growth.

    python scripts/soak.py --model runs/demo/merged --streams 500 --minutes 10

A stream is lost when it ends without a status, ends OK without its final message, or is still open at its
(generous) deadline. RSS is the server process plus its engine process, from /proc, sampled every 10 s after a
warm-up minute; growth is last minus first sample.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import yaml
from lawchat.v1 import chat_pb2, chat_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["劳动合同法第三十九条是怎么规定的？", "公司拖欠工资三个月了，我该怎么办？", "试用期最长可以约定多久？",
             "消费者权益保护法第二十五条是怎么规定的？", "劳动争议申请仲裁的时效期间是多久？"]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, MiB."""
    pids = [pid] + [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    total = 0
    for p in pids:
        try:
            total += int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{p}/status").read_text()).group(1))
        except (FileNotFoundError, AttributeError):
            pass
    return total / 1024


def start_server(model: Path, workdir: Path, max_waiting: int) -> tuple[subprocess.Popen, str]:
    cfg = yaml.safe_load((ROOT / "configs" / "server.yaml").read_text(encoding="utf-8"))
    cfg["engine"]["max_waiting"] = max_waiting
    cfg["limits"]["client_requests"] = {"rate": 0, "burst": 0}    # all soak clients share one peer IP
    (workdir / "server.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "lawchat_cli.main", "serve", "--model", str(model), "--port", "0",
                             "--metrics-port", "0", "--config", str(workdir / "server.yaml")],
                            stdout=subprocess.PIPE, stderr=(workdir / "server.log").open("w"), text=True)
    for line in proc.stdout:
        m = re.search(r"ready grpc=(\S+)", line)
        if m:
            return proc, m.group(1)
    raise SystemExit(f"server did not start; see {workdir / 'server.log'}")


async def client(stub, stop_at: float, cancel_prob: float, max_new: int, stats: dict, rng: random.Random) -> None:
    while time.monotonic() < stop_at:
        req = chat_pb2.ChatStreamRequest(messages=[chat_pb2.Message(role="user", content=rng.choice(QUESTIONS))],
                                         sampling=chat_pb2.SamplingParameters(temperature=0.8, seed=rng.getrandbits(32)),
                                         stopping=chat_pb2.StoppingCriteria(max_new_tokens=rng.randint(8, max_new)))
        cancel_after = rng.randint(1, 8) if rng.random() < cancel_prob else None
        t0 = time.monotonic()
        call = stub.ChatStream(req, timeout=300)
        n, final, ttft = 0, False, None
        try:
            async for msg in call:
                n += 1
                ttft = ttft if ttft is not None else time.monotonic() - t0
                final = msg.finish_reason != chat_pb2.FINISH_REASON_UNSPECIFIED
                if cancel_after is not None and n >= cancel_after and not final:
                    call.cancel()
                    break
        except grpc.aio.AioRpcError:
            pass
        except asyncio.CancelledError:
            pass
        code = await call.code()
        stats["codes"][code.name] += 1
        if (code == grpc.StatusCode.OK and not final) or code == grpc.StatusCode.DEADLINE_EXCEEDED:
            stats["lost"] += 1
        if code == grpc.StatusCode.OK:
            stats["e2e"].append(time.monotonic() - t0)
            if ttft is not None:
                stats["ttft"].append(ttft)
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            await asyncio.sleep(rng.uniform(0.5, 2.0))


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def run(target: str, server_pid: int, a) -> dict:
    stats = {"codes": Counter(), "lost": 0, "e2e": [], "ttft": [], "rss": []}
    channels = [grpc.aio.insecure_channel(target) for _ in range(a.channels)]
    stubs = [chat_pb2_grpc.ChatServiceStub(ch) for ch in channels]
    t_start = time.monotonic()
    stop_at = t_start + a.minutes * 60
    rng = random.Random(a.seed)
    tasks = [asyncio.create_task(client(stubs[i % len(stubs)], stop_at, a.cancel_prob, a.max_new_tokens, stats,
                                        random.Random(rng.getrandbits(32)))) for i in range(a.streams)]

    async def sample_rss():
        await asyncio.sleep(min(60, a.minutes * 60 / 4))       # warm-up: caches, allocator pools
        while time.monotonic() < stop_at:
            stats["rss"].append((time.monotonic() - t_start, rss_mb(server_pid)))
            done = sum(stats["codes"].values())
            print(f"[{time.monotonic() - t_start:6.0f} s] finished={done} lost={stats['lost']} "
                  f"rss={stats['rss'][-1][1]:.0f} MiB codes={dict(stats['codes'])}", flush=True)
            await asyncio.sleep(10)
    sampler = asyncio.create_task(sample_rss())
    await asyncio.gather(*tasks)
    sampler.cancel()
    stats["rss"].append((time.monotonic() - t_start, rss_mb(server_pid)))
    for ch in channels:
        await ch.close()
    stats["seconds"] = time.monotonic() - t_start
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "runs" / "demo" / "merged")
    ap.add_argument("--streams", type=int, default=500, help="concurrent client loops")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--cancel-prob", type=float, default=0.2, help="share of streams the client cancels mid-way")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-waiting", type=int, default=1024, help="engine.max_waiting of the soaked server")
    ap.add_argument("--channels", type=int, default=32, help="client connections the streams share")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        proc, target = start_server(a.model, Path(d), a.max_waiting)
        try:
            s = asyncio.run(run(target, proc.pid, a))
        finally:
            proc.terminate()
            rc = proc.wait(60)
        log = (Path(d) / "server.log").read_text(errors="replace")
    total = sum(s["codes"].values())
    rss = s["rss"]
    print(f"\nsoak: {a.streams} concurrent streams for {s['seconds']:.0f} s, cancel share {a.cancel_prob}, "
          f"model {a.model}, {os.cpu_count()} CPUs, commit {git_commit()}")
    print("| streams finished | lost | statuses | e2e p50 s | e2e p99 s | TTFT p99 s | RSS first MiB | RSS last MiB "
          "| RSS growth MiB | server exit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {total} | {s['lost']} | {', '.join(f'{k} {v}' for k, v in sorted(s['codes'].items()))} | "
          f"{quantile(s['e2e'], 0.5):.2f} | {quantile(s['e2e'], 0.99):.2f} | {quantile(s['ttft'], 0.99):.2f} | "
          f"{rss[0][1]:.0f} | {rss[-1][1]:.0f} | {rss[-1][1] - rss[0][1]:+.0f} | {rc} |")
    print(f"server log: {log.count('Traceback')} tracebacks, {log.count(' ERROR ')} ERROR lines")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
