"""The fast engine on CPU: continuous batching, chunked prefill, paged KV with preemption, prefix caching.

Tiny random GLM / Llama / Qwen2 models (fp32) are made here; the reference is HF `generate`, greedy, one
request at a time. EOS is ignored so every request generates exactly the tokens it asks for.
"""
from __future__ import annotations

import asyncio
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from lawchat_server.engine.block_manager import BlockManager
from lawchat_server.engine.config import EngineConfig
from lawchat_server.engine.engine import Engine, GenerationRequest
from lawchat_server.engine.model_runner import FastRunner, load_runner
from lawchat_server.engine.sampler import SamplingParams
from lawchat_server.engine.scheduler import Scheduler
from lawchat_server.engine.sequence import Sequence
from lawchat_trainer.random_model import make_random_model

TINY = dict(vocab_size=1500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5, attention_bias=True, rms_norm_eps=1e-5,
            max_position_embeddings=512)
GREEDY = SamplingParams()


@pytest.fixture(scope="module", params=["glm", "llama", "qwen2"])
def random_model(request, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"random-{request.param}")
    return make_random_model(out, tiny_model, TINY, request.param, dtype=torch.float32, seed=11)


@pytest.fixture(scope="module")
def glm_model(tiny_model, tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("random-glm"), tiny_model, TINY, "glm", dtype=torch.float32,
                             seed=5)


def hf_greedy(model_dir, prompts, lens):
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for p, n in zip(prompts, lens):
            out.append(hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False)[0, len(p):].tolist())
    return out


def prompts_and_lens(n: int, seed: int = 0, lo: int = 3, hi: int = 60):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, 1400, (int(k),), generator=g).tolist() for k in torch.randint(lo, hi, (n,), generator=g)]
    lens = [int(k) for k in torch.randint(4, 40, (n,), generator=g)]
    return prompts, lens


def run_engine(engine, requests, delays=None):
    """requests: GenerationRequest list, each started after its delay (s) -> last chunks, in order."""
    async def go():
        async def one(r, d):
            await asyncio.sleep(d)
            return [c async for c in engine.stream(r)][-1]
        return await asyncio.gather(*[one(r, d) for r, d in zip(requests, delays or [0.0] * len(requests))])
    return asyncio.run(go())


def started(model_dir, **cfg) -> Engine:
    engine = Engine(load_runner(model_dir, device="cpu", config=EngineConfig(**cfg)))
    engine.start()
    return engine


def test_fast_path_is_taken(random_model):
    engine = started(random_model)
    try:
        assert isinstance(engine.runner, FastRunner)
    finally:
        engine.stop()


def test_concurrent_greedy_equals_hf_generate(random_model):
    """10 requests of different lengths joining mid-flight, small prefill chunks, batch capped at 4."""
    prompts, lens = prompts_and_lens(10, seed=1)
    engine = started(random_model, max_num_seqs=4, max_prefill_tokens=16)
    try:
        reqs = [GenerationRequest(p, GREEDY, n, ignore_eos=True) for p, n in zip(prompts, lens)]
        outs = run_engine(engine, reqs, delays=[0.01 * i for i in range(10)])
        steps = engine.stats().steps
    finally:
        engine.stop()
    assert [o.token_ids for o in outs] == hf_greedy(random_model, prompts, lens)
    assert all(o.completion_tokens == n and o.finish_reason == "max_tokens" for o, n in zip(outs, lens))
    assert steps < sum(lens) + sum(len(p) for p in prompts) // 16   # they really shared steps


def test_full_kv_cache_preempts_and_every_stream_still_finishes(glm_model):
    prompts, lens = prompts_and_lens(6, seed=2, lo=20, hi=40)
    lens = [40] * 6
    # 12 blocks of 16 tokens: room for ~3 of these sequences (up to 80 tokens = 5 blocks each)
    engine = started(glm_model, num_kv_blocks=13, max_num_seqs=6, enable_prefix_caching=False)
    try:
        outs = run_engine(engine, [GenerationRequest(p, GREEDY, n, ignore_eos=True) for p, n in zip(prompts, lens)])
        st = engine.stats()
    finally:
        engine.stop()
    assert st.preemptions > 0
    assert st.kv_blocks_used == 0
    assert [o.token_ids for o in outs] == hf_greedy(glm_model, prompts, lens)


def test_prefix_cache_hits_return_the_same_tokens(glm_model):
    g = torch.Generator().manual_seed(3)
    system = torch.randint(10, 1400, (70,), generator=g).tolist()     # a shared "system prompt", 4+ blocks
    tails = [torch.randint(10, 1400, (k,), generator=g).tolist() for k in (5, 9, 13)]
    prompts = [system + t for t in tails]
    engine = started(glm_model)
    try:
        first = run_engine(engine, [GenerationRequest(prompts[0], GREEDY, 12, ignore_eos=True)])
        assert engine.stats().prefix_cache_hits == 0
        again = run_engine(engine, [GenerationRequest(p, GREEDY, 12, ignore_eos=True) for p in prompts])
        st = engine.stats()
    finally:
        engine.stop()
    assert st.prefix_cache_hits >= 3 * 64          # each later prompt found the 4 full blocks of the system prompt
    ref = hf_greedy(glm_model, prompts, [12] * 3)
    assert first[0].token_ids == ref[0]
    assert [o.token_ids for o in again] == ref


def test_a_burst_sharing_a_prompt_prefix_computes_it_once(glm_model):
    """Six requests with one 70-token system prompt arrive together: the first computes the prefix, the others wait
    a step for its blocks and take them from the cache (before, all six computed it side by side) — same tokens."""
    g = torch.Generator().manual_seed(4)
    system = torch.randint(10, 1400, (70,), generator=g).tolist()     # 4 full blocks
    prompts = [system + torch.randint(10, 1400, (k,), generator=g).tolist() for k in (3, 6, 9, 12, 15, 18)]
    engine = started(glm_model)
    try:
        out = run_engine(engine, [GenerationRequest(p, GREEDY, 10, ignore_eos=True) for p in prompts])
        st = engine.stats()
        deferrals = engine.blocks.deferrals
    finally:
        engine.stop()
    assert st.prefix_cache_hits >= 5 * 64 and deferrals >= 1
    assert not engine.blocks.inflight                                   # every in-flight mark was cleared
    assert [o.token_ids for o in out] == hf_greedy(glm_model, prompts, [10] * 6)


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(glm_model):
    prompts, _ = prompts_and_lens(6, seed=4)
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    engine = started(glm_model)
    try:
        alone = run_engine(engine, [GenerationRequest(prompts[0], p, 30, ignore_eos=True)])[0].token_ids
        others = [GenerationRequest(q, SamplingParams(temperature=1.0, seed=i), 25, ignore_eos=True)
                  for i, q in enumerate(prompts[1:])]
        batch = run_engine(engine, others[:3] + [GenerationRequest(prompts[0], p, 30, ignore_eos=True)] + others[3:],
                           delays=[0, 0, 0.02, 0.01, 0, 0])
        other_seed = run_engine(engine, [GenerationRequest(prompts[0], SamplingParams(temperature=0.9, top_p=0.95,
                                                                                      top_k=50, seed=99), 30,
                                                           ignore_eos=True)])[0].token_ids
    finally:
        engine.stop()
    assert batch[3].token_ids == alone
    assert other_seed != alone


def test_cancel_frees_the_blocks_within_a_step(glm_model):
    engine = started(glm_model)
    prompt, _ = prompts_and_lens(1, seed=5)

    async def go():
        stream = engine.stream(GenerationRequest(prompt[0], GREEDY, 400, ignore_eos=True))
        await stream.__anext__()
        assert engine.stats().kv_blocks_used > 0
        steps_at_cancel = engine.stats().steps
        await stream.aclose()                      # what grpc does when the client goes away
        deadline = time.monotonic() + 5
        while engine.stats().kv_blocks_used and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        return steps_at_cancel
    try:
        at_cancel = asyncio.run(go())
        st = engine.stats()
    finally:
        engine.stop()
    assert st.kv_blocks_used == 0 and st.running == 0
    assert st.steps - at_cancel <= 3               # freed at the next step, not after 400 tokens


def test_scheduler_interleaves_prefill_chunks_with_decodes():
    bm = BlockManager(num_blocks=64, block_size=16)
    sched = Scheduler(bm, max_num_seqs=8, max_prefill_tokens=16)
    short = Sequence(list(range(5)), GREEDY, 50, seed=0)
    sched.add(short)
    step = sched.schedule()
    assert step.prefill == [(short, 5)] and not step.decode
    short.num_computed += 5
    short.token_ids.append(7)                      # its first token was sampled
    long = Sequence(list(range(100, 170)), GREEDY, 5, seed=0)   # 70 tokens: 5 chunks of <= 16
    sched.add(long)
    chunks = []
    while long.num_pending > 1 or not chunks:
        step = sched.schedule()
        assert step.decode == [short]              # the running stream advances every step
        (seq, n), = step.prefill
        assert seq is long and n <= 16
        chunks.append(n)
        long.num_computed += n
        short.num_computed += 1
        short.token_ids.append(7)
        if long.num_computed == len(long):
            break
    assert sum(chunks) == 70 and len(chunks) == 5


def test_block_manager_shares_and_evicts_prefix_blocks():
    bm = BlockManager(num_blocks=6, block_size=16)    # 5 usable blocks
    a = Sequence(list(range(40)), GREEDY, 1, seed=0)
    bm.allocate(a, 40)
    a.num_computed = 40
    bm.register_full_blocks(a)                         # blocks 0-1 of a are full and hashed
    b = Sequence(list(range(33)) + [999], GREEDY, 1, seed=0)
    assert bm.match_prefix(b) == 32 and b.block_table == a.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.release(a)
    bm.release(b)
    assert bm.num_free == 5
    c = Sequence(list(range(40)), GREEDY, 1, seed=0)
    assert bm.match_prefix(c) == 32                    # freed blocks keep their prefix until reused
    bm.release(c)
    d = Sequence([5] * 80, GREEDY, 1, seed=0)
    bm.allocate(d, 80)                                 # takes every block: old prefixes are evicted
    e = Sequence(list(range(40)), GREEDY, 1, seed=0)
    assert bm.match_prefix(e) == 0


def test_generic_path_serves_other_models_the_same_way(glm_model):
    """fast_path off: HF modules, one sequence at a time, still continuous batching and the same greedy tokens."""
    prompts, lens = prompts_and_lens(4, seed=6)
    engine = started(glm_model, fast_path=False, enable_prefix_caching=True)
    try:
        assert type(engine.runner).__name__ == "HFRunner" and not engine.runner.prefix_caching
        outs = run_engine(engine, [GenerationRequest(p, GREEDY, n, ignore_eos=True) for p, n in zip(prompts, lens)])
    finally:
        engine.stop()
    assert [o.token_ids for o in outs] == hf_greedy(glm_model, prompts, lens)


def test_queue_time_is_the_wait_for_a_running_slot(glm_model):
    """With one running slot, the second request waits for the whole first generation: its queue time says so."""
    engine = started(glm_model, max_num_seqs=1)
    try:
        ids = [5, 6, 7, 8]
        t0 = time.monotonic()
        first, second = run_engine(engine, [GenerationRequest(ids, SamplingParams(), 40, ignore_eos=True),
                                            GenerationRequest(ids, SamplingParams(), 2, ignore_eos=True)])
        total = time.monotonic() - t0
        assert first.queue_seconds < 0.5 * second.queue_seconds
        assert 0 < second.queue_seconds < total and first.completion_tokens == 40
    finally:
        engine.stop()


def test_overlap_wastes_no_step_on_a_known_last_token_and_matches_sync(glm_model):
    """Overlapped steps: a sequence at its token limit is not decoded again while its last token is in flight
    (one prefill + 4 decodes for 5 tokens), and greedy output equals the synchronous engine's."""
    prompts, lens = prompts_and_lens(6, seed=3)
    outs = {}
    for overlap in (True, False):
        engine = started(glm_model, overlap=overlap, max_num_seqs=4, max_prefill_tokens=32)
        try:
            assert engine.overlap is overlap
            before = engine.stats().steps
            (lone,) = run_engine(engine, [GenerationRequest([5, 6, 7], GREEDY, 5, ignore_eos=True)])
            assert lone.completion_tokens == 5 and engine.stats().steps - before == 5
            outs[overlap] = [c.token_ids for c in run_engine(engine, [GenerationRequest(p, GREEDY, n)
                                                                      for p, n in zip(prompts, lens)])]
        finally:
            engine.stop()
    assert outs[True] == outs[False] == hf_greedy(glm_model, prompts, lens)


def test_scheduler_does_not_readmit_a_sequence_whose_token_is_in_flight():
    bm = BlockManager(num_blocks=64, block_size=16)
    sched = Scheduler(bm, max_num_seqs=8, max_prefill_tokens=64)
    seq = Sequence(list(range(5)) + [-1], GREEDY, 50, seed=0)
    seq.pending_row = 0                            # preempted while its last token is still on the device
    sched.add(seq)
    assert not sched.schedule()
    seq.token_ids[-1], seq.pending_row = 9, None
    assert sched.schedule().prefill == [(seq, 6)]


def test_eos_in_the_step_before_a_prefill_chunk_ends_the_stream_cleanly(glm_model):
    """Overlap: a stream whose token in flight is its EOS, while the next step carries another prompt's chunk,
    ends at that EOS; the other request is unaffected."""
    short = [5, 6, 7, 8]
    long_prompt = [int(t) for t in torch.randint(10, 1500, (200,), generator=torch.Generator().manual_seed(4))]
    (ref_short, ref_long) = hf_greedy(glm_model, [short, long_prompt], [12, 6])
    stop = next(i for i, t in enumerate(ref_short) if i >= 2 and t not in ref_short[:i])
    engine = started(glm_model, max_num_seqs=4, max_prefill_tokens=16)
    try:
        engine.runner.eos_ids = frozenset({ref_short[stop]})
        a, b = run_engine(engine, [GenerationRequest(short, GREEDY, 12), GenerationRequest(long_prompt, GREEDY, 6,
                                                                                            ignore_eos=True)])
        assert a.finish_reason == "eos" and a.token_ids == ref_short[:stop + 1]
        assert b.token_ids == ref_long
    finally:
        engine.stop()


def test_full_warm_up_covers_mixed_steps_and_changes_no_answer(glm_model):
    """engine.warmup = full (the CUDA default) on CPU: it runs prompts of every length class (chunked prefill
    included), a second wave while the first decodes, every sampling path; then greedy answers still equal HF's
    and the prefix cache's counters start from zero."""
    prompts, lens = prompts_and_lens(6, seed=9)
    engine = started(glm_model, warmup="full", max_num_seqs=8, max_prefill_tokens=64)
    try:
        info = engine.warmup()
        assert info["warmup"] == "full" and info["requests"] == 16
        assert max(info["prompt_lengths"]) > 64                     # a prompt longer than a prefill chunk
        assert info["steps"] > 8                                     # not one step per wave: they interleaved
        st = engine.stats()
        assert (st.prefix_cache_queries, st.prefix_cache_hits) == (0, 0) and st.running == st.waiting == 0
        outs = run_engine(engine, [GenerationRequest(p, GREEDY, n, ignore_eos=True) for p, n in zip(prompts, lens)])
    finally:
        engine.stop()
    assert [o.token_ids for o in outs] == hf_greedy(glm_model, prompts, lens)
    plain = started(glm_model)
    try:
        assert plain.warmup() == {"warmup": "minimal"}                # auto on CPU: only the runner's own
    finally:
        plain.stop()


def test_padded_mixed_steps_change_no_answer(glm_model):
    """On CUDA a mixed step's rows are padded to a multiple of ROW_MULTIPLE with scratch rows (so its GEMMs meet
    only the row counts warmed before serving). Forced on here: every mixed step's row count is a multiple of 32,
    and greedy answers still equal HF's, through chunked prefill, mixed steps and a prefix hit."""
    prompts, lens = prompts_and_lens(8, seed=12)
    prompts.append(prompts[0] + [7, 8, 9])                 # its first blocks come from the prefix cache
    lens.append(12)
    engine = Engine(load_runner(glm_model, device="cpu", config=EngineConfig(max_num_seqs=4, max_prefill_tokens=24,
                                                                                block_size=16)))
    runner = engine.runner
    runner.row_multiple = 32
    seen, forward = [], runner.model.forward

    def spy(ids, positions, cache, meta, *args, **kw):
        if meta.prefill is not None:
            seen.append((ids.shape[0], meta.num_prefill_tokens))
        return forward(ids, positions, cache, meta, *args, **kw)
    runner.model.forward = spy
    engine.start()
    try:
        outs = run_engine(engine, [GenerationRequest(p, GREEDY, n, ignore_eos=True) for p, n in zip(prompts, lens)],
                          delays=[0.01 * i for i in range(len(prompts))])
        hits = engine.stats().prefix_cache_hits
    finally:
        engine.stop()
    assert [o.token_ids for o in outs] == hf_greedy(glm_model, prompts, lens)
    assert seen and all(rows % 32 == 0 for rows, _ in seen)
    assert any(rows > n for rows, n in seen)               # scratch rows were added
    assert hits > 0
