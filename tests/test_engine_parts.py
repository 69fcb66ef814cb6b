"""Engine pieces on the tiny demo tokenizer/model: detokenizer, stop sequences, sampler, engine stream."""
from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoTokenizer

from lawchat_server.engine.detokenizer import IncrementalDetokenizer
from lawchat_server.engine.engine import Engine, EngineOverloaded, GenerationRequest
from lawchat_server.engine.model_runner import ModelRunner
from lawchat_server.engine.sampler import SamplingParams, make_generator, sample
from lawchat_server.engine.stopping import StopSequenceMatcher

TEXT = "劳动者饕餮龘靐，依法享有权利。😀 Labor law 第39条"


def test_detokenizer_never_splits_a_character(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT) // 2   # rare characters really are several byte-level tokens
    detok = IncrementalDetokenizer(tok)
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
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == "劳动合同"


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


def test_sampler_greedy_topk_and_seed():
    logits = torch.tensor([0.1, 3.0, 0.2, 2.9, -1.0])
    assert sample(logits, SamplingParams(temperature=0.0), None) == 1
    p = SamplingParams(temperature=1.0, top_k=1, seed=1)
    assert {sample(logits, p, make_generator(p, torch.device("cpu"))) for _ in range(20)} == {1}
    p = SamplingParams(temperature=1.5, top_p=0.6, seed=3)
    draws = [sample(logits, p, make_generator(p, torch.device("cpu"))) for _ in range(5)]
    assert len(set(draws)) == 1 and draws[0] in (1, 3)       # same seed, same draw; only the top-p set
    p = SamplingParams(temperature=1.0, top_p=0.6)
    g = make_generator(p, torch.device("cpu"))
    assert {sample(logits, p, g) for _ in range(200)} == {1, 3}


@pytest.fixture(scope="module")
def runner(tiny_model):
    return ModelRunner(tiny_model, device="cpu")


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
    with torch.inference_mode():
        ref = runner.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    assert last.completion_tokens == len(ref)
    text = "".join(c.delta for c in chunks)
    ref_ids = [t for t in ref if t not in runner.eos_ids]
    assert runner.tokenizer.decode(ref_ids, skip_special_tokens=True).startswith(text)
    assert "\ufffd" not in text


def test_engine_rejects_when_queue_full(runner):
    engine = Engine(runner, max_waiting=0)   # not started: nothing is ever dequeued
    ids = runner.encode_chat([{"role": "user", "content": "试用期多长？"}])
    with pytest.raises(EngineOverloaded):
        collect(engine, GenerationRequest(ids, SamplingParams(), max_new_tokens=4))
