"""bench_stream: lawchat's gRPC token stream vs the baseline HF generate + TextIteratorStreamer, same model, same run.

    python scripts/bench_stream.py --model runs/demo/merged                       # CPU, the demo model
    python scripts/bench_stream.py --random-glm6b /tmp/glm6b --device cuda        # ChatGLM3-6B shape, random bf16

Prints one table: time to first token, decode tok/s and the ratio to the baseline. With --random-glm6b the
model has ChatGLM3-6B's shape (28 layers, hidden 4096, FFN 13696, 32 heads, 2 KV groups) with the demo
tokenizer's vocabulary, and EOS is ignored so every run generates exactly --new-tokens.
"""
from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def make_random_glm6b(out: Path, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer, GlmConfig, GlmForCausalLM
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = GlmConfig(vocab_size=len(tok), hidden_size=4096, intermediate_size=13696, num_hidden_layers=28,
                    num_attention_heads=32, num_key_value_heads=2, head_dim=128, partial_rotary_factor=0.5,
                    attention_bias=True, rms_norm_eps=1e-5, max_position_embeddings=8192,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GlmForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def make_messages(runner, n_tokens: int) -> list[dict]:
    """A user turn whose templated prompt is about n_tokens long."""
    text = "劳动者有下列情形之一的，用人单位可以解除劳动合同：在试用期间被证明不符合录用条件的；严重违反用人单位的规章制度的。" * 40
    lo, hi = 1, len(text)
    while lo < hi:   # longest prefix whose prompt fits
        mid = (lo + hi + 1) // 2
        if len(runner.encode_chat([{"role": "user", "content": text[:mid]}])) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return [{"role": "user", "content": text[:lo]}]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_hf(runner, messages, new_tokens: int) -> tuple[float, float, int]:
    """-> (ttft s, decode tok/s, tokens) for HF generate with TextIteratorStreamer."""
    from transformers import TextIteratorStreamer
    ids = torch.tensor([runner.encode_chat(messages)], device=runner.device)
    streamer = TextIteratorStreamer(runner.tokenizer, skip_prompt=True, skip_special_tokens=True)
    kw = dict(max_new_tokens=new_tokens, do_sample=False, streamer=streamer)
    if not runner.eos_ids:
        kw.update(min_new_tokens=new_tokens)
    sync(runner.device)
    t0 = time.perf_counter()
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("ids", runner.model.generate(ids, **kw)))
    th.start()
    ttft = None
    for text in streamer:
        if text and ttft is None:
            ttft = time.perf_counter() - t0
    th.join()
    total = time.perf_counter() - t0
    n = out["ids"].shape[1] - ids.shape[1]
    return ttft or total, (n - 1) / max(total - (ttft or total), 1e-9), n


def bench_lawchat(target: str, messages, new_tokens: int) -> tuple[float, float, int]:
    from lawchat_client import LawchatClient
    with LawchatClient(target, timeout=600) as c:
        t0 = time.perf_counter()
        stream = c.chat_stream(messages, max_new_tokens=new_tokens)
        ttft = None
        for _ in stream:
            if ttft is None:
                ttft = time.perf_counter() - t0
        total = time.perf_counter() - t0
    n = stream.completion_tokens
    return ttft or total, (n - 1) / max(total - (ttft or total), 1e-9), n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, default=Path("runs/demo/merged"))
    p.add_argument("--random-glm6b", type=Path, default=None, help="build (once) and use a random 6B GLM here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--streams", type=int, default=4, help="concurrent streams for the aggregate row")
    a = p.parse_args()

    from lawchat_server.engine.model_runner import ModelRunner
    model_dir = a.model
    if a.random_glm6b is not None:
        if not (a.random_glm6b / "config.json").is_file():
            make_random_glm6b(a.random_glm6b, a.model)
        model_dir = a.random_glm6b
    runner = ModelRunner(model_dir, device=a.device)
    if a.random_glm6b is not None:
        runner.eos_ids = set()          # random weights: generate exactly --new-tokens
    messages = make_messages(runner, a.prompt_tokens)
    n_prompt = len(runner.encode_chat(messages))
    card = torch.cuda.get_device_name(runner.device) if runner.device.type == "cuda" else "cpu"

    # warm-up at full length: the first pass over each KV length is far slower on CUDA (measured ~10x on an
    # H200 for HF modules), so both paths see every shape once before timing
    bench_hf(runner, messages, a.new_tokens)
    hf = [bench_hf(runner, messages, a.new_tokens) for _ in range(a.runs)]
    from lawchat_server.app import ThreadedServer
    from lawchat_server.config import ServerConfig
    server = ThreadedServer(runner, ServerConfig(port=0), "bench")
    try:
        bench_lawchat(server.target, messages, a.new_tokens)
        lc = [bench_lawchat(server.target, messages, a.new_tokens) for _ in range(a.runs)]
        with ThreadPoolExecutor(a.streams) as pool:
            t0 = time.perf_counter()
            multi = list(pool.map(lambda _: bench_lawchat(server.target, messages, a.new_tokens), range(a.streams)))
            wall = time.perf_counter() - t0
    finally:
        server.stop()

    def med(rows, i):
        return sorted(r[i] for r in rows)[len(rows) // 2]

    base = med(hf, 1)
    print(f"\ncard: {card} | model: {model_dir} ({runner.dtype}) | prompt {n_prompt} tokens | "
          f"new tokens asked {a.new_tokens} | median of {a.runs} runs | torch {torch.__version__}")
    print("| path | streams | tokens/stream | TTFT ms | decode tok/s | vs HF |")
    print("|---|---|---|---|---|---|")
    print(f"| HF generate + TextIteratorStreamer (baseline) | 1 | {med(hf, 2)} | {med(hf, 0) * 1e3:.1f} | {base:.1f} | 1.00 |")
    print(f"| lawchat gRPC ChatStream via SDK | 1 | {med(lc, 2)} | {med(lc, 0) * 1e3:.1f} | {med(lc, 1):.1f} | "
          f"{med(lc, 1) / base:.2f} |")
    agg = sum(r[2] for r in multi) / wall
    print(f"| lawchat gRPC ChatStream, aggregate | {a.streams} | {med(multi, 2)} | {med(multi, 0) * 1e3:.1f} | "
          f"{agg:.1f} (wall) | {agg / base:.2f} |")


if __name__ == "__main__":
    main()
