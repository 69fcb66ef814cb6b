"""Engine pieces on the tiny demo tokenizer/model: detokenizer, stop sequences, sampler, engine stream."""
from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lawchat_server.engine.config import EngineConfig
from lawchat_server.engine.detokenizer import IncrementalDetokenizer, make_detokenizer
from lawchat_server.engine.engine import Engine, EngineOverloaded, GenerationRequest
from lawchat_server.engine.model_runner import load_runner
from lawchat_server.engine.sampler import SamplingBatch, SamplingParams, gumbel_noise, sample
from lawchat_server.engine.stopping import StopSequenceMatcher

TEXT = "劳动者饕餮龘靐，依法享有权利。😀 Labor law 第39条"


def test_detokenizer_never_splits_a_character(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT) // 2   # rare characters really are several byte-level tokens
    for detok in (IncrementalDetokenizer(tok), make_detokenizer(tok)):   # the decode path and the table path
        deltas = [detok.push(i) for i in ids]
        assert "".join(deltas) == TEXT
        assert all("\ufffd" not in d for d in deltas)
        assert "" in deltas                 # some tokens ended mid-character and were held back
        for d in deltas:                    # each delta is whole characters of the text, in order
            assert d == "" or d in TEXT


def test_detokenizer_drops_stray_bytes_the_model_emits(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    pieces = tok.encode("龘", add_special_tokens=False)
    assert len(pieces) == 3                                  # a rare character: three byte tokens
    stray = pieces[-1]                                       # its last byte alone is no character
    ids = tok.encode("劳动", add_special_tokens=False) + [stray] + tok.encode("合同", add_special_tokens=False)
    assert "\ufffd" in tok.decode(ids)
    for detok in (IncrementalDetokenizer(tok), make_detokenizer(tok)):   # the decode path and the table path
        assert "".join(detok.push(i) for i in ids) == "劳动合同"


@pytest.mark.parametrize("grow", [0, 3000])
def test_byte_table_detokenizer_equals_the_tokenizers_decode(tiny_model, grow):
    """The table path (ByteLevel tokenizers) gives HF's decode, stray bytes dropped, for any id sequence,
    special and added tokens included (grow: the benchmark tokenizer's added CJK tokens)."""
    import random

    from lawchat_server.engine.detokenizer import ByteDetokenizer, make_detokenizer
    from lawchat_trainer.random_model import grow_tokenizer
    tok = grow_tokenizer(tiny_model, grow) if grow else AutoTokenizer.from_pretrained(tiny_model)
    assert isinstance(make_detokenizer(tok), ByteDetokenizer)
    rng = random.Random(grow)
    for _ in range(500):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        detok = make_detokenizer(tok)
        ref = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).replace("\ufffd", "")
        assert "".join(detok.push(i) for i in ids) == ref, ids


def test_stop_sequence_matcher_holds_back_prefixes():
    m = StopSequenceMatcher(["<END>", "第四十条"])
    assert m.feed("用人单位<E") == ("用人单位", False)   # "<E" could begin "<END>"
    assert m.feed("X>可以") == ("<EX>可以", False)
    assert m.feed("依照第四") == ("依照", False)
    assert m.feed("十条规定") == ("", True)
    m2 = StopSequenceMatcher([])
    assert m2.feed("abc") == ("abc", False)
    m3 = StopSequenceMatcher(["##"])
    assert m3.feed("a#") == ("a", False) and m3.flush() == "#"


def batch_of(rows: list[SamplingParams], steps: list[int]) -> SamplingBatch:
    temps = [r.temperature for r in rows]
    return SamplingBatch(torch.tensor(temps), torch.tensor([r.top_p for r in rows]),
                         torch.tensor([r.top_k for r in rows]), torch.tensor([r.seed or 0 for r in rows]),
                         torch.tensor(steps), all(t == 0 for t in temps),
                         any(r.top_k > 0 or r.top_p < 1 for r in rows))


def test_sampler_greedy_topk_topp_and_seed():
    logits = torch.tensor([0.1, 3.0, 0.2, 2.9, -1.0])
    rows = lambda p, n: logits.expand(n, -1).clone()   # noqa: E731
    assert sample(rows(None, 1), batch_of([SamplingParams()], [0])).tolist() == [1]
    p = SamplingParams(temperature=1.0, top_k=1, seed=1)
    assert set(sample(rows(p, 50), batch_of([p] * 50, list(range(50)))).tolist()) == {1}
    p = SamplingParams(temperature=1.5, top_p=0.6, seed=3)
    draws = sample(rows(p, 200), batch_of([p] * 200, list(range(200)))).tolist()
    assert set(draws) == {1, 3}                              # only the top-p set, and both of it
    # the same (seed, step) draws the same token whatever else is in the batch; other seeds differ somewhere
    alone = [sample(rows(p, 1), batch_of([p], [k])).item() for k in range(20)]
    mixed = sample(rows(p, 40), batch_of([p, SamplingParams(temperature=1.0, seed=9)] * 20,
                                         [k // 2 for k in range(40)])).tolist()[0::2]
    assert alone == mixed
    other = SamplingParams(temperature=1.5, top_p=0.6, seed=4)
    assert [sample(rows(other, 1), batch_of([other], [k])).item() for k in range(20)] != alone
    # greedy and sampled rows in one batch: the greedy row stays argmax
    mix = sample(rows(None, 2), batch_of([SamplingParams(), SamplingParams(temperature=2.0, seed=5)], [0, 0]))
    assert mix[0].item() == 1


def test_gumbel_noise_is_uniformly_spread():
    noise = gumbel_noise(torch.tensor([7]), torch.tensor([0]), 20000)[0]
    u = torch.exp(-torch.exp(-noise))                        # back to uniform (0, 1)
    assert abs(u.mean().item() - 0.5) < 0.01 and u.min() > 0 and u.max() < 1
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert hist.min() > 1700 and hist.max() < 2300


@pytest.fixture(scope="module")
def runner(tiny_model):
    return load_runner(tiny_model, device="cpu")


def collect(engine, request):
    async def go():
        return [c async for c in engine.stream(request)]
    return asyncio.run(go())


def test_engine_stream_matches_hf_generate(runner):
    engine = Engine(runner)
    engine.start()
    try:
        ids = runner.encode_chat([{"role": "user", "content": "劳动合同法第三十九条是怎么规定的？"}])
        chunks = collect(engine, GenerationRequest(ids, SamplingParams(), max_new_tokens=24))
    finally:
        engine.stop()
    last = chunks[-1]
    assert last.finish_reason in ("eos", "max_tokens") and all(c.finish_reason is None for c in chunks[:-1])
    assert last.prompt_tokens == len(ids)
    hf = AutoModelForCausalLM.from_pretrained(runner.model_dir).eval()
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    assert last.token_ids == ref
    text = "".join(c.delta for c in chunks)
    ref_ids = [t for t in ref if t not in runner.eos_ids]
    assert runner.tokenizer.decode(ref_ids, skip_special_tokens=True).startswith(text)
    assert "\ufffd" not in text


def test_engine_rejects_when_queue_full(runner):
    engine = Engine(runner, EngineConfig(max_waiting=2))   # not started: nothing is ever admitted
    ids = runner.encode_chat([{"role": "user", "content": "试用期多长？"}])

    async def go():
        streams = [engine.stream(GenerationRequest(ids, SamplingParams(), max_new_tokens=4)) for _ in range(3)]
        pending = [asyncio.ensure_future(s.__anext__()) for s in streams[:2]]
        await asyncio.sleep(0.05)
        assert engine.waiting == 2
        with pytest.raises(EngineOverloaded):
            await asyncio.wait_for(streams[2].__anext__(), 5)   # a third one waits no longer: it is refused
        for p in pending:
            p.cancel()
    asyncio.run(go())


def test_generate_batch_waits_out_a_full_queue(runner):
    """More prompts than the engine will queue (tiny KV cache, max_waiting=1): every one is still answered."""
    from lawchat_server.engine.engine import generate_batch
    engine = Engine(runner, EngineConfig(max_waiting=1, max_num_seqs=2, num_kv_blocks=8))
    engine.start()
    try:
        ids = runner.encode_chat([{"role": "user", "content": "试用期多长？"}])
        out = generate_batch(engine, [ids] * 12, 6, ignore_eos=True)
    finally:
        engine.stop()
    assert [c.completion_tokens for c in out] == [6] * 12


def test_engine_trace_logs_steps_and_first_tokens_without_text(runner, tmp_path):
    """engine.trace: one JSON line per step (its prompt tokens and decode rows add up to the work done) and one per
    request's first token (arrival <= admitted <= first token, on time.monotonic); no token ids or text."""
    import dataclasses
    import json
    import time as time_

    from lawchat_server.engine.engine import generate_batch
    trace = tmp_path / "trace.jsonl"
    engine = Engine(runner, dataclasses.replace(runner.config, trace=str(trace)))
    engine.start()
    prompts = [runner.encode_chat([{"role": "user", "content": q}]) for q in ("试用期多长？", "加班费怎么算？", "劳动合同法第三十九条")]
    t0 = time_.monotonic()
    try:
        generate_batch(engine, prompts, 5, ignore_eos=True)
    finally:
        engine.stop()
    lines = [json.loads(ln) for ln in trace.read_text().splitlines()]
    steps = [x for x in lines if "step" in x]
    firsts = [x for x in lines if "first_token" in x]
    assert sum(x["prefill_tokens"] for x in steps) == sum(map(len, prompts))
    assert sum(x["decode"] for x in steps) == 3 * 4                     # 5 tokens each: the first from the prefill
    assert sorted(x["prompt"] for x in firsts) == sorted(map(len, prompts))
    for x in firsts:
        assert t0 <= x["arrival"] <= x["admitted"] <= x["first_token"] <= time_.monotonic()
    assert all(set(x) <= {"step", "schedule_ms", "launch_ms", "finish_ms", "prefill_seqs", "prefill_tokens", "decode",
                          "waiting", "running", "first_token", "arrival", "admitted", "prompt"} for x in lines)


def test_a_profile_window_from_the_environment_covers_the_steps_asked_for(runner, monkeypatch, caplog):
    """LAWCHAT_PROFILE_STEPS=N@R (read by the engine process): once R sequences run, one profiler window of N engine
    steps is logged; nothing without the variable."""
    import logging
    import re
    import time as time_

    from lawchat_server.engine.engine import generate_batch
    from lawchat_server.engine.profiling import PROFILE_ENV, busy_and_gaps, profile_from_env
    assert busy_and_gaps([(20, 30), (0, 10), (5, 12)]) == (22, 30, [8])
    engine = Engine(runner)
    engine.start()
    prompts = [runner.encode_chat([{"role": "user", "content": q}]) for q in ("试用期多长？", "加班费怎么算？")]
    caplog.set_level(logging.INFO, logger="lawchat.engine")
    try:
        monkeypatch.delenv(PROFILE_ENV, raising=False)
        profile_from_env(engine, cuda=False)
        # a typo, or more sequences than the engine runs, costs the window, never the engine
        for bad in ("x", "3@y", "0", "3@-1", "1001", f"3@{runner.config.max_num_seqs + 1}"):
            monkeypatch.setenv(PROFILE_ENV, bad)
            profile_from_env(engine, cuda=False)
        monkeypatch.setenv(PROFILE_ENV, "3@2")
        profile_from_env(engine, cuda=False)
        generate_batch(engine, prompts, 12, ignore_eos=True)
        deadline = time_.monotonic() + 10
        while "profiler window" not in caplog.text and time_.monotonic() < deadline:
            time_.sleep(0.05)
    finally:
        engine.stop()
    windows = [r.getMessage() for r in caplog.records if "profiler window" in r.getMessage()]
    assert len(windows) == 1
    got = re.match(rf"{PROFILE_ENV}=3@2 \((\d+) sequences running\): profiler window: (\d+) steps", windows[0])
    assert got and int(got[1]) == 2 and 3 <= int(got[2]) <= 5      # polled: a fast CPU step or two may run over
    assert sum("no profile window" in r.getMessage() for r in caplog.records) == 6
