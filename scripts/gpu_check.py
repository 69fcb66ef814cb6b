"""gpu_check: the fast engine's CUDA parts against references, then engine-level throughput on a 6B GLM.

    python scripts/gpu_check.py --tokenizer runs/demo/merged [--skip-6b]

1. Triton paged decode vs the torch gather+SDPA path (bf16, GQA, ragged lengths, every split count); the
   varlen prefill (FlashAttention-2 varlen, chunks continuing cached context) vs SDPA per chunk.
2. Greedy tokens of the engine (CUDA graphs + Triton, fp32) vs HF generate on tiny random GLM / Llama / Qwen2,
   8 concurrent requests of different lengths; LoRA adapters served unmerged (BGMV kernel inside the graphs)
   vs HF generate on their `lawchat merge` output, several adapters and none in one batch.
3. ChatGLM3-6B shape, random bf16 weights: engine throughput (no gRPC) at 1/16/64/256 concurrent streams.
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import torch

from lawchat_server.engine.attention import decode_attention_torch  # noqa: E402
from lawchat_server.engine.config import EngineConfig  # noqa: E402
from lawchat_server.engine.engine import Engine, GenerationRequest  # noqa: E402
from lawchat_server.engine.model_runner import load_runner  # noqa: E402
from lawchat_server.engine.sampler import SamplingParams  # noqa: E402
from lawchat_trainer.random_model import make_random_adapter, make_random_model  # noqa: E402
from bench_serving import copy_bandwidth  # noqa: E402  (scripts/ is on sys.path when run as a script)

TINY = dict(vocab_size=2000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, partial_rotary_factor=0.5, attention_bias=True, rms_norm_eps=1e-5,
            max_position_embeddings=1024)


def check_kernel() -> None:
    from lawchat_server.engine.triton_attention import paged_decode
    torch.manual_seed(0)
    dev = "cuda"
    for heads, kvh, d, bs in ((32, 2, 128, 16), (4, 2, 32, 16), (8, 8, 64, 32)):
        blocks = 300
        cache = torch.randn(2, blocks, bs, kvh, d, device=dev, dtype=torch.bfloat16)
        lens = torch.tensor([1, 5, 16, 17, 100, 383, 1000, 2000], device=dev, dtype=torch.int32)
        w = int((lens.max() + bs - 1) // bs)
        tables = torch.randint(1, blocks, (len(lens), w), device=dev, dtype=torch.int32)
        q = torch.randn(len(lens), heads, d, device=dev, dtype=torch.bfloat16)
        ref = decode_attention_torch(q.float(), cache.float(), tables, lens)
        for splits in (1, 2, 4, 16):
            out = paged_decode(q, cache, tables, lens, splits).float()
            err = (out - ref).abs().max().item()
            print(f"kernel heads={heads} kvh={kvh} d={d} bs={bs} splits={splits}: max abs err {err:.4f}")
            assert err < 2e-2, err


def check_varlen() -> None:
    """One FlashAttention-2 varlen call over packed chunks (bf16) vs SDPA per chunk (fp32); chunks with a cached
    prefix (q_len < k_len) check that the causal mask is aligned bottom-right."""
    from lawchat_server.engine.attention import PrefillBatch, varlen_causal
    torch.manual_seed(0)
    for heads, kvh, d in ((32, 2, 128), (4, 2, 64)):
        chunks = [(7, 7), (1, 300), (64, 64), (128, 900), (333, 333), (16, 17)]     # (q_len, k_len)
        bounds, qs, ks = [], 0, 0
        for ql, kl in chunks:
            bounds.append((qs, ql, ks, kl))
            qs, ks = qs + ql, ks + kl
        cu = torch.tensor([[b[0] for b in bounds] + [qs], [b[2] for b in bounds] + [ks]], dtype=torch.int32,
                          device="cuda")
        pb = PrefillBatch(cu[0], cu[1], max(c[0] for c in chunks), max(c[1] for c in chunks), None, bounds)
        q = torch.randn(qs, heads, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(ks, kvh, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out = varlen_causal(q, k, v, pb).float()
        ref = varlen_causal(q.float(), k.float(), v.float(), pb)      # fp32: the per-chunk SDPA path
        err = (out - ref).abs().max().item()
        print(f"varlen prefill heads={heads} kvh={kvh} d={d}: max abs err {err:.4f} vs per-chunk SDPA")
        assert err < 2e-2, err


def check_fused_ops() -> None:
    """triton_ops against model.py's torch ops (bf16; GLM's interleaved partial rotary and Llama's halves)."""
    from lawchat_server.engine import triton_ops
    from lawchat_server.engine.attention import write_kv
    from lawchat_server.engine.model import ModelShape, add_rms_norm, apply_rotary, silu_mul
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    x, r = (torch.randn(7, 4096, device=dev, dtype=dt) for _ in range(2))
    w = torch.randn(4096, device=dev, dtype=dt)
    y_ref, r_ref = add_rms_norm(x, r.clone(), w, 1e-5)
    y, r2 = triton_ops.add_rms_norm(x, r.clone(), w, 1e-5)
    print(f"add_rms_norm: max err y {(y - y_ref).abs().max().item():.4f}, residual {(r2 - r_ref).abs().max().item()}")
    assert torch.equal(r2, r_ref) and (y.float() - y_ref.float()).abs().max() < 0.13   # 1 bf16 ulp at 16
    gu = torch.randn(7, 2 * 13696, device=dev, dtype=dt)
    err = (triton_ops.silu_mul(gu).float() - silu_mul(gu).float()).abs().max().item()
    print(f"silu_mul: max err {err:.4f}")
    assert err < 0.07
    for heads, kvh, d, rd, inter in ((32, 2, 128, 64, True), (8, 2, 64, 64, False), (4, 2, 16, 8, True)):
        shape = ModelShape(0, 0, 0, heads, kvh, d, 1e-5, rd, inter)
        t, blocks, bs = 9, 10, 16
        qkv = torch.randn(t, (heads + 2 * kvh) * d, device=dev, dtype=dt)
        pos = torch.randint(0, 500, (t,), device=dev)
        slots = torch.randperm(blocks * bs, device=dev)[:t]
        freqs = torch.outer(torch.arange(512, device=dev).float(), torch.rand(rd // 2, device=dev))
        cos, sin = freqs.cos().to(dt), freqs.sin().to(dt)
        q, k, v = qkv.split([heads * d, kvh * d, kvh * d], dim=-1)
        q_ref = apply_rotary(q.reshape(t, heads, d), cos[pos], sin[pos], shape)
        k_ref = apply_rotary(k.reshape(t, kvh, d), cos[pos], sin[pos], shape)
        cache_ref = torch.zeros(2, blocks, bs, kvh, d, device=dev, dtype=dt)
        write_kv(cache_ref, k_ref, v.reshape(t, kvh, d), slots)
        cache = torch.zeros_like(cache_ref)
        qkv2 = qkv.clone()
        triton_ops.rotary_write_kv(qkv2, pos, cos, sin, cache, slots, heads, kvh, d, rd, inter)
        eq = (qkv2[:, :heads * d].view(t, heads, d).float() - q_ref.float()).abs().max().item()
        ec = (cache.float() - cache_ref.float()).abs().max().item()
        print(f"rotary_write_kv heads={heads} kvh={kvh} d={d} rd={rd} interleaved={inter}: max err q {eq:.4f}, cache {ec:.4f}")
        assert eq < 0.05 and ec < 0.05


def bench_attention() -> None:
    """Decode attention per layer call, ChatGLM3 shape (32 heads, 2 KV groups, d 128), 16-token blocks."""
    from lawchat_server.engine.triton_attention import paged_decode
    dev, bs, ctx_len = "cuda", 16, 384
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print("| batch | context | Triton paged (us) | torch gather + SDPA (us) | speed-up |\n|---|---|---|---|---|")
    for b in (1, 16, 64, 256):
        w = ctx_len // bs
        cache = torch.randn(2, b * w + 1, bs, 2, 128, device=dev, dtype=torch.bfloat16)
        tables = torch.arange(1, b * w + 1, device=dev, dtype=torch.int32).view(b, w)
        lens = torch.full((b,), ctx_len, device=dev, dtype=torch.int32)
        q = torch.randn(b, 32, 128, device=dev, dtype=torch.bfloat16)
        want = max(1, (2 * sms) // (b * 2))
        splits = min(16, 1 << (want.bit_length() - 1))
        times = []
        for fn in (lambda: paged_decode(q, cache, tables, lens, splits),
                   lambda: decode_attention_torch(q, cache, tables, lens)):
            for _ in range(5):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(100):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / 100)
        print(f"| {b} | {ctx_len} | {times[0]:.1f} | {times[1]:.1f} | {times[1] / times[0]:.1f}x |")
    bench_flex_attention()


def bench_flex_attention() -> None:
    """FlexAttention (compiled) decode over a contiguous KV with a length mask: a lower bound for a paged
    FlexAttention (which adds a page-table indirection in its block mask)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
        dev, ctx_len = "cuda", 384
        print("| batch | FlexAttention decode, contiguous KV (us) |\n|---|---|")
        for b in (1, 16, 64, 256):
            q = torch.randn(b, 32, 1, 128, device=dev, dtype=torch.bfloat16)
            k = torch.randn(b, 2, ctx_len, 128, device=dev, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            lens = torch.full((b,), ctx_len, device=dev)
            mask = create_block_mask(lambda bi, h, qi, ki: ki < lens[bi], b, None, 1, ctx_len, device=dev)
            fn = lambda: flex(q, k, v, block_mask=mask, enable_gqa=True)   # noqa: E731
            for _ in range(3):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(100):
                fn()
            end.record()
            torch.cuda.synchronize()
            print(f"| {b} | {start.elapsed_time(end) * 1e3 / 100:.1f} |", flush=True)
    except Exception as e:   # report, do not stop the other checks
        print(f"FlexAttention: failed: {type(e).__name__}: {str(e)[:300]}")


def check_greedy(tokenizer: Path, tmp: Path) -> None:
    from transformers import AutoModelForCausalLM
    for model_type in ("glm", "llama", "qwen2"):
        d = make_random_model(tmp / model_type, tokenizer, TINY, model_type, dtype=torch.float32, seed=1)
        runner = load_runner(d, device="cuda", dtype="float32", config=EngineConfig(max_num_seqs=16))
        engine = Engine(runner)
        engine.start()
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).cuda().eval()
        g = torch.Generator().manual_seed(3)
        prompts = [torch.randint(10, 1900, (int(n),), generator=g).tolist() for n in torch.randint(3, 70, (8,), generator=g)]
        lens = [int(n) for n in torch.randint(5, 60, (8,), generator=g)]

        async def run_all():
            async def one(p, n, delay):
                await asyncio.sleep(delay)
                chunks = [c async for c in engine.stream(GenerationRequest(p, SamplingParams(), n, ignore_eos=True))]
                return chunks[-1]
            return await asyncio.gather(*[one(p, n, 0.002 * i) for i, (p, n) in enumerate(zip(prompts, lens))])

        outs = asyncio.run(run_all())
        bad = 0
        for p, n, last in zip(prompts, lens, outs):
            with torch.inference_mode():
                ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False)[0, len(p):].tolist()
            bad += last.token_ids != ref
        print(f"greedy {model_type}: {len(prompts) - bad}/{len(prompts)} equal to HF generate, "
              f"graphs={runner.graph_batch_sizes[:4]}..., attention={runner.attention_backend}")
        engine.stop()
        del hf, runner, engine
        torch.cuda.empty_cache()


def check_bgmv() -> None:
    from lawchat_server.engine.triton_lora import bgmv
    torch.manual_seed(0)
    for k, n, r in ((4096, 4608, 48), (4096, 27392, 32), (13696, 4096, 16)):      # 6B qkv, gate_up, down
        A = torch.randn(4, r, k, device="cuda", dtype=torch.bfloat16) * 0.02
        B = torch.randn(4, n, r, device="cuda", dtype=torch.bfloat16) * 0.02
        x, y = torch.randn(64, k, device="cuda", dtype=torch.bfloat16), torch.randn(64, n, device="cuda", dtype=torch.bfloat16)
        idx = torch.randint(-1, 4, (64,), device="cuda", dtype=torch.int32)
        ref = y.float().clone()
        for i, s_ in enumerate(idx.tolist()):
            if s_ >= 0:
                ref[i] += (x[i].float() @ A[s_].float().T) @ B[s_].float().T
        out = y.clone()
        bgmv(x, A, B, idx, out)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(100):
            bgmv(x, A, B, idx, y.clone())
        torch.cuda.synchronize()
        print(f"bgmv K={k} N={n} R={r} x64 rows: max abs err {(out.float() - ref).abs().max().item():.4f} "
              f"(bf16 output), {(time.perf_counter() - t0) * 1e4:.1f} us/call incl. a clone")


def check_adapters(tokenizer: Path, tmp: Path) -> None:
    """Per model type: 2 random adapters (attention r8, MLP r16) over a tiny fp32 model; 12 concurrent requests with
    a1, a2 or none, staggered (mixed prefill+decode steps, graph replays, 2 slots) vs the same requests on engines
    serving each `lawchat merge` output (same graphs path). Random tiny models have near-tied logits, so HF generate
    on the merged model is not the reference here: check_greedy compares the engine with HF."""
    from lawchat_trainer.merge import merge
    for model_type in ("glm", "llama"):
        base = make_random_model(tmp / f"{model_type}-base", tokenizer, TINY, model_type, dtype=torch.float32, seed=1)
        mlp = ["gate_up_proj"] if model_type == "glm" else ["gate_proj", "up_proj"]
        ads = {"a1": make_random_adapter(base, tmp / f"{model_type}-a1", ["q_proj", "k_proj", "v_proj", "o_proj"], 8, 1),
               "a2": make_random_adapter(base, tmp / f"{model_type}-a2", [*mlp, "down_proj"], 16, 2)}
        g = torch.Generator().manual_seed(5)
        reqs = [(torch.randint(10, 1900, (int(n),), generator=g).tolist(), [None, "a1", "a2"][i % 3],
                 int(torch.randint(8, 40, (1,), generator=g))) for i, n in enumerate(torch.randint(20, 90, (12,), generator=g))]

        def serve(model_dir: Path, adapters: dict, requests) -> tuple[list[list[int]], list[int]]:
            runner = load_runner(model_dir, device="cuda", dtype="float32",
                                 config=EngineConfig(max_num_seqs=16, adapters=adapters, max_loras=2 if adapters else 0))
            engine = Engine(runner)
            engine.start()

            async def run_all():
                async def one(p, ad, n, delay):
                    await asyncio.sleep(delay)
                    return [c async for c in engine.stream(GenerationRequest(p, SamplingParams(), n, ignore_eos=True,
                                                                             adapter=ad))][-1].token_ids
                return await asyncio.gather(*[one(p, ad, n, 0.003 * i) for i, (p, ad, n) in enumerate(requests)])
            try:
                return asyncio.run(run_all()), runner.graph_batch_sizes
            finally:
                engine.stop()
        got, graphs = serve(base, {k: str(v) for k, v in ads.items()}, [(p, ad or "base", n) for p, ad, n in reqs])
        same = 0
        for name in (None, "a1", "a2"):
            merged = base
            if name is not None:
                merged = merge(ads[name], tmp / f"{model_type}-{name}-merged")
            mine = [(i, (p, None, n)) for i, (p, ad, n) in enumerate(reqs) if ad == name]
            want, _ = serve(merged, {}, [r for _, r in mine])
            same += sum(got[i] == w for (i, _), w in zip(mine, want))
        print(f"adapters {model_type}: {same}/{len(reqs)} unmerged (a1 attention r8, a2 MLP r16, none; 2 slots; graphs "
              f"{graphs[:4]}...) equal to the merged models on the same engine path")
        torch.cuda.empty_cache()


def engine_throughput(model_dir: Path, streams: list[int], new_tokens: int = 256, prompt_len: int = 128) -> None:
    runner = load_runner(model_dir, device="cuda", config=EngineConfig(max_num_seqs=max(streams), max_waiting=1024,
                                                                       enable_prefix_caching=False))
    runner.warmup()
    engine = Engine(runner)
    engine.start()
    g = torch.Generator().manual_seed(0)

    async def run(n):
        prompts = [torch.randint(100, 60000, (prompt_len,), generator=g).tolist() for _ in range(n)]
        t0 = time.perf_counter()
        ttfts = []

        async def one(p):
            first = None
            async for c in engine.stream(GenerationRequest(p, SamplingParams(), new_tokens, ignore_eos=True)):
                if first is None:
                    first = time.perf_counter() - t0
            ttfts.append(first)
        await asyncio.gather(*[one(p) for p in prompts])
        return time.perf_counter() - t0, sorted(ttfts)

    print("| streams | wall s | output tok/s | TTFT p50 ms | steps |")
    print("|---|---|---|---|---|")
    asyncio.run(run(2))
    for n in streams:
        s0 = engine.stats().steps
        wall, ttfts = asyncio.run(run(n))
        print(f"| {n} | {wall:.2f} | {n * new_tokens / wall:.0f} | {ttfts[len(ttfts) // 2] * 1e3:.1f} | "
              f"{engine.stats().steps - s0} |", flush=True)
    # decode step alone (graph replay + sampling + sync), batch 1 and 64
    engine.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--model-6b", type=Path, default=Path("/tmp/glm6b"))
    ap.add_argument("--skip-6b", action="store_true")
    ap.add_argument("--streams", default="1,16,64,256")
    ap.add_argument("--only", default=None, help="comma list: kernels, greedy, adapters (default: everything)")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else {"kernels", "greedy", "adapters", "6b"}
    print(torch.cuda.get_device_name(), torch.__version__)
    if "kernels" in only:
        check_kernel()
        check_varlen()
        check_fused_ops()
        bench_attention()
    with tempfile.TemporaryDirectory() as tmp:
        if "greedy" in only:
            check_greedy(args.tokenizer, Path(tmp))
        if "adapters" in only:
            check_bgmv()
            check_adapters(args.tokenizer, Path(tmp))
    if "6b" not in only:
        return
    if args.skip_6b:
        return
    if not (args.model_6b / "config.json").is_file():
        t0 = time.perf_counter()
        make_random_model(args.model_6b, args.tokenizer, device="cuda")
        print(f"made {args.model_6b} in {time.perf_counter() - t0:.0f} s")
        torch.cuda.empty_cache()
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s -> weight-read limit for one stream "
          f"{bw / (6.24e9 * 2):.0f} tok/s (6.24 G params bf16)")
    engine_throughput(args.model_6b, [int(s) for s in args.streams.split(",")])


if __name__ == "__main__":
    main()
