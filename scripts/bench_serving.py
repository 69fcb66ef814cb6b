"""bench_serving: the real gRPC server under 1/16/64/256 concurrent streams from several client processes,
with the HF generate baseline and the card's copy-bandwidth limit measured in the same run.

    python scripts/bench_serving.py --random-glm6b /tmp/glm6b --tokenizer runs/demo/merged --device cuda
    python scripts/bench_serving.py --model runs/demo/merged --streams 1,16          # CPU, the demo model

    python scripts/bench_serving.py ... --prompt-tokens 900 --streams 64,128 --first-burst 64  # retrieval-shaped
    python scripts/bench_serving.py ... --prompt-tokens 900 --scenario shared-system            # or multi-turn

Every request asks for exactly 256 new tokens (EOS ignored); every round sends new prompts (no prefix-cache hits
across rounds: --scenario names the hits a round is about). Reported as vLLM's serving benchmark does: output
tok/s over the round's wall time, TTFT p50/p99, TPOT (time per output token after the first) p50/p99, the gap
between stream messages p50/p99 — and on CUDA each row's physical bound from rates measured in the same run
(`Bounds`): throughput and TTFT if prefill ran at the card's matmul rate and decode at its copy bandwidth (or, where
256 streams make a decode step compute-bound, at the matmul rate).
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

READY_RE = re.compile(r"lawchat serve: ready grpc=(\S+) metrics=(\S+)")
FILLER = "劳动者有下列情形之一的用人单位可以解除劳动合同在试用期间被证明不符合录用条件严重违反规章制度失职营私舞弊造成重大损害"


def make_prompts(tokenizer_dir: Path, n: int, n_tokens: int, seed: int = 0) -> list[str]:
    """n different user questions whose templated prompts are about n_tokens long."""
    from transformers import AutoTokenizer

    from lawchat_server.prompt import encode_prompt
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(seed)
    vocab = [t for t in tok.get_added_vocab() if len(t) == 1 and "\u4e00" <= t <= "\u9fff"] or list(FILLER)
    overhead = len(encode_prompt(tok, [{"role": "user", "content": ""}]))      # the template's own tokens
    length = lambda text: overhead + len(tok.encode(text, add_special_tokens=False))   # noqa: E731
    out = []
    for _ in range(n):       # random characters, then the shortest prefix whose prompt reaches n_tokens
        text = ""
        while length(text) < n_tokens:
            text += "".join(rng.choice(vocab) for _ in range(64))
        lo, hi = max(0, len(text) - 64), len(text)
        while lo < hi:
            mid = (lo + hi) // 2
            if length(text[:mid]) < n_tokens:
                lo = mid + 1
            else:
                hi = mid
        out.append(text[:lo])
    return out


def prompt_tokens(tokenizer_dir: Path, questions: list) -> int:
    """Mean templated prompt length of the questions (user texts or message lists), in tokens."""
    from transformers import AutoTokenizer

    from lawchat_server.prompt import encode_prompt
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    msgs = [[{"role": "user", "content": q}] if isinstance(q, str) else q for q in questions]
    return round(sum(len(encode_prompt(tok, m)) for m in msgs) / len(msgs))


def bench_hf(model_dir: Path, device: str, question: str, new_tokens: int) -> tuple[float, float]:
    """-> (TTFT s, decode tok/s) of HF generate + TextIteratorStreamer, one stream, after a warm-up run."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    from lawchat_server.prompt import encode_prompt
    tok = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    ids = torch.tensor([encode_prompt(tok, [{"role": "user", "content": question}])], device=device)
    result = None
    for _ in range(2):   # the first run warms up every KV length
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=streamer)
        th = threading.Thread(target=lambda: model.generate(ids, **kw))
        t0 = time.perf_counter()
        th.start()
        ttft = None
        for text in streamer:
            if text and ttft is None:
                ttft = time.perf_counter() - t0
        th.join()
        total = time.perf_counter() - t0
        result = (ttft, (new_tokens - 1) / (total - ttft))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def copy_bandwidth() -> float:
    import torch
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 2 * 10 * x.numel() / (time.perf_counter() - t0)
    del x, y
    torch.cuda.empty_cache()
    return bw


def matmul_rate() -> float:
    """The card's bf16 matmul rate (FLOP/s), measured: 8192^3 products."""
    import torch
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    rate = 20 * 2 * 8192 ** 3 / (time.perf_counter() - t0)
    del a, b
    torch.cuda.empty_cache()
    return rate


class Bounds:
    """Physical bounds of a round on this card, from the model's shape and the rates measured in the same run:
    prefill at the matmul rate (weights + causal attention FLOPs), decode at the copy bandwidth (weights + the
    KV cache read every step), run one after the other; TTFT when prompts are prefilled first come first served."""

    def __init__(self, model_dir: Path, rate: float, bw: float):
        import json

        from safetensors import safe_open
        cfg = json.loads((model_dir / "config.json").read_text())
        params = embed = 0
        for f in model_dir.glob("*.safetensors"):
            with safe_open(f, "pt") as st:
                for k in st.keys():
                    n = math.prod(st.get_slice(k).get_shape())
                    params += n
                    embed += n if "embed_tokens" in k else 0
        heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
        hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
        self.matmul_params = params - embed                  # an embedding lookup is not a matmul
        self.q_width = heads * hd * layers                   # attention FLOPs per (query, key) pair: 4 x this
        self.kv_bytes = layers * 2 * cfg["num_key_value_heads"] * hd * 2     # bf16 K and V per token
        self.rate, self.bw = rate, bw

    def prefill_s(self, prompt: int, cached: int = 0) -> float:
        """Prefill of positions [cached, prompt) of one prompt (the rest served by the prefix cache)."""
        new = prompt - cached
        return (2 * self.matmul_params * new + 4 * self.q_width * (prompt * (prompt + 1) - cached * (cached + 1)) / 2
                ) / self.rate

    def round(self, n: int, prompt: int, new: int, cached: int = 0) -> dict:
        """Decode steps read the weights and the KV cache at the copy bandwidth, or, with many streams, compute
        2 x params FLOPs a row at the matmul rate: whichever takes longer (256 streams are compute-bound)."""
        reads = new * 2 * self.matmul_params + n * self.kv_bytes * new * (prompt + new / 2)
        flops = new * n * 2 * self.matmul_params
        one = self.prefill_s(prompt, cached)
        total = n * one + max(reads / self.bw, flops / self.rate)
        return dict(tok_s=n * new / total, ttft50=math.ceil(0.5 * n) * one, ttft99=math.ceil(0.99 * n) * one)


def client_process(target: str, items: list[tuple[int, str | list[dict], str | None]], new_tokens: int,
                   start_at: float, results) -> None:
    from lawchat_client import LawchatClient
    rows = []
    lock = threading.Lock()

    def one(i: int, q: str | list[dict], adapter: str | None) -> None:
        with LawchatClient(target, timeout=600) as c:
            while time.time() < start_at:
                time.sleep(0.001)
            t0, sent = time.perf_counter(), time.monotonic()
            stream = c.chat_stream(q, max_new_tokens=new_tokens, ignore_eos=True, adapter=adapter)
            stamps, text = [], []
            for delta in stream:
                stamps.append(time.perf_counter())
                text.append(delta)
            end = time.perf_counter()
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        with lock:
            rows.append((stamps[0] - t0, end - t0, stream.completion_tokens, gaps, i, "".join(text), sent))

    threads = [threading.Thread(target=one, args=item) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(rows)


def run_round(target: str, questions: list, new_tokens: int, processes: int, adapters: list | None = None) -> dict:
    """All streams start together; questions are user texts or message lists, `adapters` the LoRA adapter of each
    (None: the server's default). -> stats, and `answers` in order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    items = [(i, q, adapters[i] if adapters else None) for i, q in enumerate(questions)]
    shares = [items[i::processes] for i in range(min(processes, len(items)))]
    start_at = time.time() + 2.0
    procs = [ctx.Process(target=client_process, args=(target, s, new_tokens, start_at, results)) for s in shares]
    for p in procs:
        p.start()
    rows = [r for _ in procs for r in results.get(timeout=900)]
    for p in procs:
        p.join()
    wall = max(r[1] for r in rows)              # every stream started at start_at (within a few ms)
    ttft = sorted(r[0] for r in rows)
    tpot = sorted((r[1] - r[0]) / max(1, r[2] - 1) for r in rows)
    gaps = sorted(g for r in rows for g in r[3]) or [0.0]
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]   # noqa: E731
    return dict(tokens=sum(r[2] for r in rows), tok_s=sum(r[2] for r in rows) / wall,
                ttft50=q(ttft, .5), ttft99=q(ttft, .99), tpot50=q(tpot, .5), tpot99=q(tpot, .99),
                gap50=q(gaps, .5), gap99=q(gaps, .99), msgs_per_stream=(len(gaps) + len(rows)) / len(rows),
                answers=[r[5] for r in sorted(rows, key=lambda r: r[4])], sent=sorted(r[6] for r in rows),
                first=sorted(r[6] + r[0] for r in rows))


def read_trace(path: Path, offset: int) -> tuple[list[dict], int]:
    """The engine's trace lines (engine.trace) written since byte `offset` -> (records, new offset)."""
    import json
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    return [json.loads(ln) for ln in data.decode().splitlines() if ln.strip()], offset + len(data)


def trace_breakdown(r: dict, records: list[dict]) -> str:
    """Where a round's first tokens went, on one clock (time.monotonic, from the first stream's send): streams sent
    by the clients, requests arriving in the engine, admitted to a step, first token sampled, first token at the
    client (p50 / p99 of each); then the steps of the round: prefill steps (count, prompt tokens a step, ms a
    step) and decode-only steps."""
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")   # noqa: E731
    t0 = r["sent"][0]
    firsts = [x for x in records if "first_token" in x]
    steps = [x for x in records if "step" in x]
    rows = [("sent by client", r["sent"]), ("arrived in engine", sorted(x["arrival"] for x in firsts)),
            ("admitted", sorted(x["admitted"] for x in firsts)),
            ("first token sampled", sorted(x["first_token"] for x in firsts)), ("first token at client", r["first"])]
    out = ["  " + " | ".join(f"{name} p50 {(q(xs, .5) - t0) * 1e3:.0f} / p99 {(q(xs, .99) - t0) * 1e3:.0f} ms"
                             for name, xs in rows)]
    pre = [x for x in steps if x["prefill_tokens"]]
    dec = [x for x in steps if not x["prefill_tokens"]]
    gaps = [b["step"] - a["step"] for a, b in zip(steps, steps[1:])]
    span = lambda xs: sum(b["step"] - a["step"] for a, b in zip(steps, steps[1:]) if a in xs)   # noqa: E731
    if pre:
        until = max(x["first_token"] for x in firsts) if firsts else pre[-1]["step"]
        early = [x for x in pre if x["step"] <= until]
        out.append(f"  {len(pre)} prefill steps: {sum(x['prefill_tokens'] for x in pre) / len(pre):.0f} prompt tokens, "
                   f"{sum(x['prefill_seqs'] for x in pre) / len(pre):.1f} prompts, {sum(x['decode'] for x in pre) / len(pre):.1f} "
                   f"decode rows a step; {len(early)} before the last first token, those spanning "
                   f"{span(early) * 1e3:.0f} ms (schedule {sum(x['schedule_ms'] for x in early):.0f}, launch "
                   f"{sum(x['launch_ms'] for x in early):.0f}, finish {sum(x['finish_ms'] for x in early):.0f} ms)")
    if dec:
        mean = lambda k: sum(x[k] for x in dec) / len(dec)     # noqa: E731
        out.append(f"  {len(dec)} decode-only steps: {mean('decode'):.0f} rows, step-to-step p50 "
                   f"{q(sorted(b['step'] - a['step'] for a, b in zip(steps, steps[1:]) if a in dec), .5) * 1e3:.2f} ms; "
                   f"engine thread a step: schedule {mean('schedule_ms'):.2f}, launch {mean('launch_ms'):.2f}, finish "
                   f"(incl. the wait for ids) {mean('finish_ms'):.2f} ms")
    if steps and "cuda_mallocs" in steps[0]:   # the caching allocator: a retry waited for the whole device
        out.append(f"  allocator during the round: {steps[-1]['cuda_mallocs'] - steps[0]['cuda_mallocs']} cudaMalloc "
                   f"calls, {steps[-1]['alloc_retries'] - steps[0]['alloc_retries']} retries (cache flushes)")
    if gaps:
        out.append(f"  step-to-step p50 {q(sorted(gaps), .5) * 1e3:.2f} / p99 {q(sorted(gaps), .99) * 1e3:.2f} ms over "
                   f"{len(steps)} steps")
    return "\n".join(out)


SCENARIOS = ("plain", "shared-system", "multi-turn")


def scenario_round(target: str, scenario: str, questions: list[str], new_tokens: int, processes: int,
                   tok_dir: Path, system: str = "", follow_ups: list[str] = ()) -> dict:
    """plain: each stream its own prompt. shared-system: one long system message before each stream's own short
    question (its blocks come from the prefix cache after the first stream). multi-turn: each stream's first turn,
    then (the measured round) its second: that question, the answer and a new question, the first prompt of which
    the prefix cache may serve. -> run_round's stats + prompt_len (mean, tokens) and cached (tokens per prompt the
    cache can serve: the bound assumes it does)."""
    if scenario == "plain":
        sent, cached = questions, 0
    elif scenario == "shared-system":
        sent = [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in questions]
        cached = prompt_tokens(tok_dir, [[{"role": "system", "content": system}]]) // 16 * 16
    else:
        first = run_round(target, questions, new_tokens, processes)
        sent = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}, {"role": "user", "content": f}]
                for q, a, f in zip(questions, first["answers"], follow_ups)]
        cached = (prompt_tokens(tok_dir, questions) - 2) // 16 * 16   # the first turn's prompt, less its reply cue
    return {**run_round(target, sent, new_tokens, processes), "prompt_len": prompt_tokens(tok_dir, sent),
            "cached": cached}


MODES = {"process": {}, "sync": {"overlap": False}, "thread": {"separate_process": False},   # engine overrides
         "nowarm": {"warmup": "minimal"}}     # the engine process without the full warm-up (before issue 18)


def start_py_spy(server_pid: int, out: Path, mode: str, seconds: int = 6) -> list[subprocess.Popen]:
    """py-spy record of the server process and its engine process: raw collapsed stacks of the thread holding
    the GIL (--gil), by thread."""
    import shutil
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out.mkdir(parents=True, exist_ok=True)
    pids = {"server": server_pid}
    for child in Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split():
        cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "resource_tracker" not in cmd:
            pids["engine"] = int(child)
    return [subprocess.Popen([spy, "record", "--format", "raw", "--threads", "--gil", "--nonblocking", "-r", "200", "-d",
                              str(seconds), "-p", str(pid), "-o", str(out / f"{mode}-{name}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT) for name, pid in pids.items()]


def start_server(model_dir: Path, device: str, max_streams: int, log_path: Path,
                 engine: dict | None = None) -> tuple[subprocess.Popen, str]:
    cfg = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "server.yaml").read_text())
    cfg["engine"].update(max_num_seqs=max(max_streams, 1), max_waiting=4096, **(engine or {}))
    cfg["limits"]["client_requests"] = {"rate": 0, "burst": 0}     # every benchmark client is one peer IP
    cfg_path = log_path.with_suffix(".yaml")
    cfg_path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    cmd = [sys.executable, "-m", "lawchat_cli.main", "serve", "--model", str(model_dir), "--device", device,
           "--port", "0", "--metrics-port", "0", "--config", str(cfg_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_path.open("w"), text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:
        m = READY_RE.search(line)
        if m:
            return proc, m.group(1)
    raise RuntimeError(f"server did not start:\n{log_path.read_text()[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path("runs/demo/merged"))
    ap.add_argument("--random-glm6b", type=Path, default=None, help="build (once) and serve a random 6B GLM here")
    ap.add_argument("--tokenizer", type=Path, default=Path("runs/demo/merged"), help="for --random-glm6b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--streams", default="1,16,64,256")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--clients", type=int, default=8, help="client processes")
    ap.add_argument("--first-burst", type=int, default=0,
                    help="N: the first traffic after ready is a burst of N streams (measured before any warm-up "
                         "round; compare with the warm row of the same N)")
    ap.add_argument("--engine-modes", default="process,sync",
                    help="comma list of: process (engine in its own process, overlapped steps: the default), sync "
                         "(the same with engine.overlap off: the baseline of the overlap), thread (engine in-process), "
                         "nowarm (process with engine.warmup minimal: the baseline of the warm-up)")
    ap.add_argument("--scenario", choices=SCENARIOS, default="plain",
                    help="plain: a prompt of its own per stream; shared-system: a shared system message of "
                         "--prompt-tokens - 64 tokens + a 64-token question; multi-turn: the second turn of chats "
                         "whose first prompt had --prompt-tokens")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF generate baseline (its column shows -)")
    ap.add_argument("--trace", action="store_true",
                    help="profile: the engine writes its step trace (engine.trace) and each row prints where its first "
                         "tokens' time went (client send, engine arrival, admission, first token) and its steps")
    ap.add_argument("--trace-out", type=Path, default=None,
                    help="keep each mode's server log (and with --trace its raw trace) here")
    ap.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                    help="record the server and engine processes with py-spy (raw stacks, by thread) during the "
                         "largest row's round into DIR")
    ap.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                    help="an engine setting for every mode, e.g. --engine max_prefill_tokens=8192 (repeatable)")
    a = ap.parse_args()
    engine_sets = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.engine)}
    streams = [int(s) for s in a.streams.split(",")]

    model_dir = a.model
    if a.random_glm6b is not None:
        model_dir = a.random_glm6b
        if not (model_dir / "config.json").is_file():
            from lawchat_trainer.random_model import make_random_model
            make_random_model(model_dir, a.tokenizer, device=a.device)
    import torch
    card = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    questions = make_prompts(model_dir, sum(streams) + 8 + a.first_burst * len(a.engine_modes.split(",")),
                             a.prompt_tokens)
    hf_ttft, hf_tok_s = (float("nan"),) * 2 if a.no_hf else bench_hf(model_dir, a.device, questions[0], a.new_tokens)
    prompt_len = prompt_tokens(model_dir, questions)
    row_questions, system, follow_ups = questions, "", [""] * sum(streams)
    if a.scenario == "shared-system":
        row_questions = make_prompts(model_dir, sum(streams), 64, seed=1)
        system = make_prompts(model_dir, 1, a.prompt_tokens - 64, seed=2)[0]
    elif a.scenario == "multi-turn":
        follow_ups = make_prompts(model_dir, sum(streams), 64, seed=3)
    limit = bounds = None
    if a.device.startswith("cuda"):
        from safetensors import safe_open
        n_bytes = 0
        for f in model_dir.glob("*.safetensors"):
            with safe_open(f, "pt") as st:
                n_bytes += sum(2 * math.prod(st.get_slice(k).get_shape()) for k in st.keys())   # bf16
        bw = copy_bandwidth()
        limit = bw / n_bytes
        bounds = Bounds(model_dir, matmul_rate(), bw)
    results, firsts, log_tail, traces = {}, {}, "", []
    spare = sum(streams)                                           # first bursts take prompts from here on
    for mode in a.engine_modes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            t_start = time.perf_counter()
            trace = Path(tmp) / "trace.jsonl"
            proc, target = start_server(model_dir, a.device, max(streams), Path(tmp) / "server.log",
                                         {**MODES[mode], **engine_sets, **({"trace": str(trace)} if a.trace else {})})
            startup = time.perf_counter() - t_start
            offset = 0

            def traced(name: str, r: dict) -> dict:
                nonlocal offset
                if a.trace:
                    records, offset = read_trace(trace, offset)
                    traces.append(f"[{mode}] {name}:\n" + trace_breakdown(r, records))
                return r
            try:
                if a.first_burst:                                  # the first users after ready: no warm-up round
                    if a.trace:
                        offset = read_trace(trace, 0)[1]           # the warm-up's steps
                    first_spies = start_py_spy(proc.pid, a.py_spy, f"{mode}-first") if a.py_spy else []
                    firsts[mode] = (startup, traced(f"first burst of {a.first_burst}", run_round(
                        target, questions[spare:spare + a.first_burst], a.new_tokens, a.clients)))
                    spare += a.first_burst
                    for spy in first_spies:
                        spy.wait(60)
                run_round(target, questions[-8:], 16, 2)          # warm-up: connections, first shapes
                rows, used, spies = [], 0, []
                for n in streams:
                    if a.trace:
                        offset = read_trace(trace, offset)[1]
                    if a.py_spy and n == max(streams):
                        spies = start_py_spy(proc.pid, a.py_spy, mode)
                    rows.append((n, traced(f"{n} streams", scenario_round(
                        target, a.scenario, row_questions[used:used + n], a.new_tokens, a.clients, model_dir, system,
                        follow_ups[used:used + n]))))
                    used += n
                for spy in spies:
                    spy.wait(60)
                results[mode] = rows
            finally:
                proc.terminate()
                proc.wait(60)
                log = (Path(tmp) / "server.log").read_text()
                if a.trace_out:     # the whole log (a LAWCHAT_PROFILE_STEPS window's kernel table), the raw trace
                    a.trace_out.mkdir(parents=True, exist_ok=True)
                    (a.trace_out / f"server-{mode}.log").write_text(log)
                    if a.trace and trace.is_file():
                        trace.replace(a.trace_out / f"trace-{mode}.jsonl")
                log_tail += f"[{mode}] " + "".join(ln + "\n" for ln in log.splitlines() if "engine: " in ln) + log[-600:]
    print(f"\ncard: {card} | model: {model_dir} | scenario {a.scenario}, prompt ~{a.prompt_tokens} tokens, "
          f"{a.new_tokens} new tokens "
          f"(EOS ignored) | {a.clients} client processes | torch {torch.__version__}"
          + (f" | engine {engine_sets}" if engine_sets else ""))
    if limit:
        print(f"copy bandwidth {bw / 1e12:.2f} TB/s, weights {n_bytes / 1e9:.2f} GB -> one-stream limit {limit:.0f} tok/s; "
              f"bf16 matmul {bounds.rate / 1e12:.0f} TFLOP/s -> prefill of one {prompt_len}-token prompt "
              f"{bounds.prefill_s(prompt_len) * 1e3:.1f} ms")
    print(f"baseline HF generate + TextIteratorStreamer, 1 stream: TTFT {hf_ttft * 1e3:.1f} ms, {hf_tok_s:.1f} tok/s")
    print("| engine | streams | prompt tokens (cacheable) | output tok/s | vs HF | bound tok/s | vs bound | TTFT p50 ms (bound) | "
          "TTFT p99 ms (bound) | TPOT p50 ms | TPOT p99 ms | msg gap p50 ms | msg gap p99 ms | msgs/stream |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for mode, n, r in [(m, n, r) for m, rows in results.items() for n, r in rows]:
        b = bounds.round(n, r["prompt_len"], a.new_tokens, r["cached"]) if bounds else None
        bound = f"{b['tok_s']:.0f} | {r['tok_s'] / b['tok_s']:.2f}" if b else "- | -"
        t50 = f" ({b['ttft50'] * 1e3:.0f})" if b else ""
        t99 = f" ({b['ttft99'] * 1e3:.0f})" if b else ""
        print(f"| {mode} | {n} | {r['prompt_len']} ({r['cached']}) | {r['tok_s']:.0f} | {r['tok_s'] / hf_tok_s:.1f} | {bound} | {r['ttft50'] * 1e3:.1f}{t50} | "
              f"{r['ttft99'] * 1e3:.1f}{t99} | {r['tpot50'] * 1e3:.2f} | {r['tpot99'] * 1e3:.2f} | {r['gap50'] * 1e3:.2f} | "
              f"{r['gap99'] * 1e3:.2f} | {r['msgs_per_stream']:.0f} |")
    for mode, (startup, r) in firsts.items():
        warm = dict(results[mode]).get(a.first_burst)
        print(f"\nfirst burst after ready ({mode}; process start -> ready {startup:.1f} s, warm-up included): "
              f"{a.first_burst} streams TTFT p50 {r['ttft50'] * 1e3:.1f} ms / p99 {r['ttft99'] * 1e3:.1f} ms, "
              f"{r['tok_s']:.0f} tok/s" + (f" | the same burst warm: p50 {warm['ttft50'] * 1e3:.1f} / p99 "
                                           f"{warm['ttft99'] * 1e3:.1f} ms, {warm['tok_s']:.0f} tok/s -> first/warm "
                                           f"p50 {r['ttft50'] / warm['ttft50']:.2f}x" if warm else ""))
    if traces:
        print("\nengine trace (time.monotonic from each round's first send):\n" + "\n".join(traces))
    print("server log tail:\n" + log_tail)


if __name__ == "__main__":
    main()
