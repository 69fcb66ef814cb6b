"""bench_adapters: LoRA adapters served unmerged vs the same load on a single model, through gRPC and the SDK.

    python scripts/bench_adapters.py --random-glm6b /tmp/glm6b --tokenizer runs/gpu-tok --device cuda

Two servers in turn on one card: the model alone (what serving a merged adapter costs: a merged model has the base's
shapes), then the same model with --adapters r=--rank q/k/v adapters. After one round that is not kept, each row
is the mean of two rounds: 1 stream; --streams streams, each with one of the adapters round robin (and, on the
adapter server, all on the base model: the cost of the LoRA kernels when no row uses them). Then LoadAdapter of one more adapter while a round of streams runs: its time, and
the stream message gaps of that round. Every round sends new prompts (bench_serving.make_prompts), 256 new tokens,
EOS ignored; the adapters are random (B small: bf16 answers stay in range).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench_serving import make_prompts, run_round, start_server


def write_random_lora(out: Path, base: Path, r: int, seed: int, targets=("q_proj", "k_proj", "v_proj")) -> Path:
    """A PEFT-format LoRA adapter (adapter_config.json + adapter_model.safetensors) with random weights, written
    directly: building it through PEFT would load the 6B model once per adapter."""
    from safetensors.torch import save_file
    cfg = json.loads((base / "config.json").read_text())
    heads, kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    outs = {"q_proj": heads * hd, "k_proj": kvh * hd, "v_proj": kvh * hd}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for t in targets:
            key = f"base_model.model.model.layers.{layer}.self_attn.{t}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(r, cfg["hidden_size"], generator=g) * 0.01).bfloat16()
            tensors[f"{key}.lora_B.weight"] = (torch.randn(outs[t], r, generator=g) * 0.01).bfloat16()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
        "target_modules": list(targets), "bias": "none", "base_model_name_or_path": str(base)}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path("runs/demo/merged"))
    ap.add_argument("--random-glm6b", type=Path, default=None, help="build (once) and serve a random 6B GLM here")
    ap.add_argument("--tokenizer", type=Path, default=Path("runs/demo/merged"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--clients", type=int, default=8)
    a = ap.parse_args()
    model_dir = a.model
    if a.random_glm6b is not None:
        model_dir = a.random_glm6b
        if not (model_dir / "config.json").is_file():
            from lawchat_trainer.random_model import make_random_model
            make_random_model(model_dir, a.tokenizer, device=a.device)
    card = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    names = [f"a{i}" for i in range(a.adapters)]
    paths = {n: write_random_lora(tmp / n, model_dir, a.rank, i) for i, n in enumerate(names + ["extra"])}
    print(f"wrote {a.adapters + 1} random r={a.rank} q/k/v adapters in {time.perf_counter() - t0:.1f} s")
    n = a.streams
    questions = iter(make_prompts(model_dir, 14 * n + 64, a.prompt_tokens))
    take = lambda k: [next(questions) for _ in range(k)]     # noqa: E731   new prompts every round
    rows = []

    def row(server: str, what: str, r: dict) -> None:
        rows.append((server, what, r))
        print(f"  {server} | {what}: {r['tok_s']:.0f} tok/s, TTFT p50 {r['ttft50'] * 1e3:.1f} ms", flush=True)

    def measured(target: str, k: int, adapters: list, processes: int) -> dict:
        """Two rounds of k new streams; -> their mean (the rounds' tok/s kept in 'rounds')."""
        rs = [run_round(target, take(k), a.new_tokens, processes, adapters) for _ in range(2)]
        mean = {key: sum(r[key] for r in rs) / 2 for key in ("tok_s", "ttft50", "ttft99", "tpot50", "gap99")}
        return {**mean, "rounds": [round(r["tok_s"]) for r in rs]}

    for server, engine in (("single model", {"max_loras": 0}),
                           (f"{a.adapters} adapters", {"adapters": {k: str(paths[k]) for k in names},
                                                        "max_loras": a.adapters + 1, "max_lora_rank": a.rank})):
        proc, target = start_server(model_dir, a.device, n, tmp / f"{server[:6]}.log".replace(" ", "_"), engine)
        try:
            ads = names if engine.get("adapters") else [None]
            run_round(target, take(n), a.new_tokens, a.clients, [ads[i % len(ads)] for i in range(n)])  # not kept
            row(server, "1 stream" + (f" ({ads[0]})" if ads[0] else ""), measured(target, 1, [ads[0]], 1))
            row(server, f"{n} streams" + (f" over {len(ads)} adapters" if ads[0] else ""),
                measured(target, n, [ads[i % len(ads)] for i in range(n)], a.clients))
            if not engine.get("adapters"):
                continue
            row(server, f"{n} streams, all on the base", measured(target, n, ["base"] * n, a.clients))
            from lawchat_client import LawchatClient
            loaded = {}

            def load_during_round() -> None:
                time.sleep(2.5)                       # run_round starts its streams 2 s after it is called: 0.5 s in
                with LawchatClient(target, timeout=60) as ops:
                    t = time.perf_counter()
                    loaded.update(ops.load_adapter("extra", str(paths["extra"])))
                    loaded["rpc_s"] = time.perf_counter() - t
            th = threading.Thread(target=load_during_round)
            th.start()
            r = run_round(target, take(n), a.new_tokens, a.clients, [names[i % len(names)] for i in range(n)])
            th.join()
            row(server, f"{n} streams over {len(ads)} adapters, LoadAdapter during the round",
                {**r, "rounds": [round(r["tok_s"])]})
            first = run_round(target, take(1), 32, 1, ["extra"])
            print(f"LoadAdapter of a r={a.rank} q/k/v adapter during {n} streams: RPC {loaded['rpc_s'] * 1e3:.0f} ms "
                  f"(server: read + check {loaded['load_seconds'] * 1e3:.0f} ms); the round's msg gap p99 "
                  f"{r['gap99'] * 1e3:.1f} ms (max within the round's TPOT p99 {r['tpot99'] * 1e3:.1f} ms); "
                  f"first request on it: TTFT {first['ttft50'] * 1e3:.1f} ms", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"\ncard: {card} | model {model_dir} | prompts ~{a.prompt_tokens} tokens, {a.new_tokens} new tokens (EOS "
          f"ignored) | adapters: {a.adapters} random r={a.rank} q/k/v | torch {torch.__version__}")
    single = {w.split(" ")[0]: r for s, w, r in rows if s == "single model"}
    print("| server | load | output tok/s (rounds) | vs single model | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | "
          "msg gap p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for s, w, r in rows:
        ref = single.get(w.split(" ")[0])
        print(f"| {s} | {w} | {r['tok_s']:.0f} ({', '.join(map(str, r['rounds']))}) | {r['tok_s'] / ref['tok_s']:.2f} | "
              f"{r['ttft50'] * 1e3:.1f} | {r['ttft99'] * 1e3:.1f} | {r['tpot50'] * 1e3:.2f} | {r['gap99'] * 1e3:.1f} |")


if __name__ == "__main__":
    main()
