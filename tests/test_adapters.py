"""LoRA adapters served unmerged over one base: each adapter's greedy answers equal its `lawchat merge` output's,
token for token, with sequences of several adapters (and none) in one batch, a slot pool smaller than the adapters
(LRU eviction) and prompts the prefix cache has seen under another adapter; adapters loaded, listed and unloaded
at run time through AdminService on a real server (admin scope, refusals with reasons), chosen per request by the
SDK, the CLI and the official openai SDK (`model` = adapter name)."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch

from conftest import BIN, start_server
from lawchat_client import LawchatClient, LawchatError, NO_RETRY

QUESTIONS = ["劳动合同法第三十九条是怎么规定的？", "公司不签劳动合同怎么办？", "试用期可以随时辞退吗？"]
# a shared system turn: the prompts share their first blocks, which the prefix cache must keep apart per adapter
SYSTEM = "你是法律小助手。请依据中华人民共和国现行法律回答用户的问题，先说结论，再引用相关法条的原文，最后给出建议。"
N = 24


@pytest.fixture(scope="module")
def adapters(tiny_demo, tmp_path_factory):
    """a1: the demo's trained adapter (q, v; r 4); a2: random over k, o, gate_up, down (r 8); their merged dirs
    (`lawchat merge`); and adapters a server must refuse: one trained on another base, one of rank 16."""
    from lawchat_trainer.merge import merge
    from lawchat_trainer.random_model import make_random_adapter, make_random_model
    d = tmp_path_factory.mktemp("adapters")
    base = tiny_demo / "base"
    out = {"base": base, "a1": tiny_demo / "lora" / "final",
           "a2": make_random_adapter(base, d / "a2", ["k_proj", "o_proj", "gate_up_proj", "down_proj"], 8, 1),
           "r16": make_random_adapter(base, d / "r16", ["q_proj"], 16, 2)}
    for name in ("a1", "a2"):
        merge(out[name], d / f"{name}-merged")
        out[f"{name}-merged"] = d / f"{name}-merged"
    other = make_random_model(d / "other-base", base, dict(vocab_size=1200, hidden_size=32, intermediate_size=64,
                                                           num_hidden_layers=2, num_attention_heads=2,
                                                           num_key_value_heads=1, head_dim=16,
                                                           partial_rotary_factor=0.5, max_position_embeddings=512),
                              dtype=torch.float32)
    out["other"] = make_random_adapter(other, d / "other", ["q_proj"], 4, 3)
    return out


def prompts(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer
    from lawchat_server.prompt import encode_prompt
    tok = AutoTokenizer.from_pretrained(model_dir)
    return [encode_prompt(tok, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
            for q in QUESTIONS]


def greedy(model_dir: Path, requests: list[tuple[list[int], str | None]], rounds: int = 1, **engine) -> list[list[int]]:
    """The requests at once through the engine (continuous batching), `rounds` times one after the other (later
    rounds find the earlier ones' blocks in the prefix cache) -> each one's generated ids, round after round."""
    from lawchat_server.engine.config import EngineConfig
    from lawchat_server.engine.engine import Engine, GenerationRequest
    from lawchat_server.engine.model_runner import load_runner
    from lawchat_server.engine.sampler import SamplingParams
    e = Engine(load_runner(model_dir, config=EngineConfig(**engine)))
    e.start()

    async def run():
        async def one(ids, adapter):
            return [c async for c in e.stream(GenerationRequest(ids, SamplingParams(), N, adapter=adapter))][-1]
        out = []
        for _ in range(rounds):
            out += await asyncio.gather(*[one(ids, ad) for ids, ad in requests])
        return out
    try:
        return [c.token_ids for c in asyncio.run(run())]
    finally:
        e.stop()


@pytest.mark.parametrize("slots", [4, 1])
def test_adapters_unmerged_answer_as_their_merged_models_in_mixed_batches(adapters, slots):
    ids = prompts(adapters["base"])
    # every prompt under every adapter, in two rounds: in the second the prefix cache holds each prompt's blocks
    # under all three
    mix = [(p, ad) for p in ids for ad in ("a1", "a2", "base")]
    got = greedy(adapters["base"], mix, rounds=2, adapters={"a1": str(adapters["a1"]), "a2": str(adapters["a2"])},
                 max_loras=slots)
    mix = mix * 2
    want = {ad: greedy(adapters[f"{ad}-merged"] if ad != "base" else adapters["base"], [(p, None) for p in ids])
            for ad in ("a1", "a2", "base")}
    for (p, ad), out in zip(mix, got):
        assert out == want[ad][ids.index(p)], (ad, QUESTIONS[ids.index(p)])
    assert want["a1"] != want["base"] and want["a2"] != want["base"]     # each adapter changes the answers


def test_the_pool_serves_the_configured_adapters_modules_unless_told_otherwise(adapters):
    from lawchat_server.engine.config import EngineConfig
    from lawchat_server.engine.lora import served_modules
    assert served_modules(EngineConfig(adapters={"a1": str(adapters["a1"])})) == ("qkv",)            # q_proj, v_proj
    assert served_modules(EngineConfig(adapters={"a1": str(adapters["a1"]), "a2": str(adapters["a2"])})) == (
        "qkv", "o", "gate_up", "down")
    assert served_modules(EngineConfig(max_loras=2)) == ("qkv", "o", "gate_up", "down")
    assert served_modules(EngineConfig(max_loras=2, lora_target_modules=["down_proj", "q_proj"])) == ("qkv", "down")
    with pytest.raises(ValueError, match="lora_target_modules"):
        EngineConfig(lora_target_modules=["lm_head"]).validate()


def test_a_default_adapter_answers_requests_that_name_none(adapters):
    ids = prompts(adapters["base"])
    got = greedy(adapters["base"], [(ids[0], None), (ids[0], "base")], adapters={"a2": str(adapters["a2"])},
                 default_adapter="a2")
    assert got[0] == greedy(adapters["a2-merged"], [(ids[0], None)])[0]
    assert got[1] == greedy(adapters["base"], [(ids[0], None)])[0]


def test_adapters_that_do_not_fit_are_refused_with_the_reason(adapters, tmp_path):
    from lawchat_server.engine.lora import AdapterError, LoraShape, read_adapter
    shape = LoraShape(num_layers=2, hidden=64, q=64, kv=32, inter=128, rank=8)     # the tiny demo's shape
    read_adapter("ok", adapters["a2"], shape, torch.float32)
    cut = tmp_path / "cut"
    shutil.copytree(adapters["a2"], cut)
    data = (cut / "adapter_model.safetensors").read_bytes()
    (cut / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])            # a copy cut short
    with pytest.raises(AdapterError, match="not readable"):
        read_adapter("x", cut, shape, torch.float32)
    (tmp_path / "listcfg").mkdir()
    (tmp_path / "listcfg" / "adapter_config.json").write_text("[1, 2]")          # JSON, but not a config
    with pytest.raises(AdapterError, match="not a JSON object"):
        read_adapter("x", tmp_path / "listcfg", shape, torch.float32)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    for path, words in ((adapters["other"], "trained on another base"), (adapters["r16"], "above engine.max_lora_rank"),
                        (tmp_path, "DoRA"), (tmp_path / "nope", "not a PEFT adapter directory")):
        with pytest.raises(AdapterError, match=words):
            read_adapter("x", path, shape, torch.float32)
    with pytest.raises(AdapterError, match="serves adapters on q_proj, k_proj, v_proj only"):
        read_adapter("x", adapters["a2"], shape, torch.float32, ("qkv",))
    for name in ("base", "", "a/b", "x" * 65):
        with pytest.raises(AdapterError, match="adapter name"):
            read_adapter(name, adapters["a2"], shape, torch.float32)


# -- a real server -------------------------------------------------------------------------------------------
def make_key(name: str, scope: str) -> tuple[str, str]:
    r = subprocess.run([str(BIN / "lawchat"), "keys", "new", name, "--scope", scope], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stderr.strip().splitlines()[-1], r.stdout.strip()


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(LawchatError) as e:
        fn()
    return e.value.code


def chat(q: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]


def test_adapters_over_a_real_server(adapters, tmp_path):
    import openai
    (chat_key, chat_line), (admin_key, admin_line) = make_key("alice", "chat"), make_key("ops", "chat,admin")
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{chat_line}\n{admin_line}\n")
    srv = start_server(adapters["base"], tmp_path / "server.log", "--api-keys-file", str(keys), "--adapter",
                       f"a1={adapters['a1']}", "--max-loras", "2", "--max-lora-rank", "8", "--http-port", "0",
                       "--served-model-name", "tiny", "--set",
                       "engine.lora_target_modules=[q_proj, k_proj, v_proj, o_proj, gate_up_proj, down_proj]")
    want = {}
    for name in ("a1", "a2"):
        want[name] = greedy(adapters[f"{name}-merged"], [(prompts(adapters["base"])[0], None)])[0]
    try:
        with LawchatClient(srv.target, api_key=chat_key, retry=NO_RETRY, timeout=60) as alice, \
                LawchatClient(srv.target, api_key=admin_key, retry=NO_RETRY, timeout=60) as ops:
            ask = dict(temperature=0.0, max_new_tokens=N)
            tok = __import__("transformers").AutoTokenizer.from_pretrained(adapters["base"])
            # the server's streaming detokenizer drops byte pieces that never complete a character (a tiny model
            # emits some); decode() shows them as U+FFFD
            text = lambda ids: tok.decode(ids, skip_special_tokens=True).replace("\ufffd", "")   # noqa: E731
            assert alice.chat(chat(QUESTIONS[0]), adapter="a1", **ask).text == text(want["a1"])
            assert code_of(lambda: alice.chat(chat(QUESTIONS[0]), adapter="a2", **ask)) == grpc.StatusCode.NOT_FOUND
            assert code_of(lambda: alice.list_adapters()) == grpc.StatusCode.PERMISSION_DENIED
            assert code_of(lambda: alice.load_adapter("a2", str(adapters["a2"]))) == grpc.StatusCode.PERMISSION_DENIED

            # loaded at run time, live for the next request, while a stream on a1 runs beside it
            stream = alice.chat_stream(QUESTIONS[1], adapter="a1", temperature=0.0, max_new_tokens=64, ignore_eos=True)
            first = next(iter(stream))
            r = ops.load_adapter("a2", str(adapters["a2"]))
            assert r["adapter"]["rank"] == 8 and r["adapter"]["target_modules"] == ["down_proj", "gate_up_proj",
                                                                                  "k_proj", "o_proj"]
            assert alice.chat(chat(QUESTIONS[0]), adapter="a2", **ask).text == text(want["a2"])
            assert first + "".join(stream) and stream.finish_reason == "max_tokens"
            listed = {a["name"]: a for a in ops.list_adapters()}
            assert set(listed) == {"a1", "a2"} and listed["a1"]["requests"] == 2 and listed["a2"]["requests"] == 1

            for name, path, code, words in (
                    ("x", adapters["other"], grpc.StatusCode.FAILED_PRECONDITION, "trained on another base"),
                    ("x", adapters["r16"], grpc.StatusCode.FAILED_PRECONDITION, "max_lora_rank 8"),
                    ("x", "/no/such/dir", grpc.StatusCode.FAILED_PRECONDITION, "not a PEFT adapter directory"),
                    ("base", adapters["a2"], grpc.StatusCode.INVALID_ARGUMENT, "not 'base'")):
                with pytest.raises(LawchatError) as e:
                    ops.load_adapter(name, str(path))
                assert e.value.code == code and words in str(e.value), (path, e.value)

            # the OpenAI API: `model` names the adapter; the model list shows them
            http = srv.stdout_lines[0].split("openai=")[1].split()[0]
            client = openai.OpenAI(base_url=http, api_key=chat_key, max_retries=0)
            assert {m.id for m in client.models.list().data} == {"tiny", "a1", "a2"}
            out = client.chat.completions.create(model="a2", messages=chat(QUESTIONS[0]),
                                                 max_tokens=N, temperature=0)
            assert out.model == "a2" and out.choices[0].message.content == alice.chat(
                chat(QUESTIONS[0]), adapter="a2", temperature=0.0, max_new_tokens=N).text
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.create(model="a3", messages=[{"role": "user", "content": "你好"}])

            status = ops.status()
            assert {a["name"] for a in status["adapters"]} == {"a1", "a2"}
            metrics = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
            assert 'lawchat_adapter_requests_total{adapter="a2"} 3.0' in metrics

            # the CLI: chat --adapter, and adapters list / unload
            cli = [str(BIN / "lawchat-client"), "--target", srv.target, "--api-key", admin_key]
            r = subprocess.run([*cli, "chat", QUESTIONS[0], "--adapter", "a1", "--max-new-tokens", str(N),
                                "--temperature", "0"], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            r = subprocess.run([*cli, "adapters", "unload", "a2"], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0 and json.loads(r.stdout) == {"name": "a2"}, r.stderr
            r = subprocess.run([*cli, "adapters"], capture_output=True, text=True, timeout=60)
            assert [a["name"] for a in json.loads(r.stdout)["adapters"]] == ["a1"]
            assert code_of(lambda: alice.chat(chat(QUESTIONS[0]), adapter="a2", **ask)) == grpc.StatusCode.NOT_FOUND
            assert code_of(lambda: ops.unload_adapter("a2")) == grpc.StatusCode.NOT_FOUND
    finally:
        srv.stop()


def test_the_prefix_cache_keeps_the_same_tokens_apart_per_adapter_load():
    from types import SimpleNamespace
    from lawchat_server.engine.block_manager import BlockManager
    from lawchat_server.engine.sampler import SamplingParams
    from lawchat_server.engine.sequence import Sequence
    bm = BlockManager(64, 16)
    ids = list(range(100, 150))
    a, a_again = SimpleNamespace(salt=b"lora-1"), SimpleNamespace(salt=b"lora-2")     # two loads of one name
    first = Sequence(ids, SamplingParams(), 4, 0, adapter=a)
    bm.allocate(first, len(ids))
    first.num_computed = len(ids)
    bm.register_full_blocks(first)
    for adapter, hits in ((None, 0), (a_again, 0), (a, 48)):
        seq = Sequence(ids, SamplingParams(), 4, 0, adapter=adapter)
        assert bm.match_prefix(seq) == hits, adapter
        bm.release(seq)


def test_an_adapter_loaded_at_run_time_survives_an_engine_restart(adapters, tmp_path):
    """kill -9 of the engine process mid-stream: the stream ends UNAVAILABLE, the supervisor's new engine serves the
    configured adapter and the one loaded at run time again, with the same answers."""
    import os
    import signal
    import time

    from test_server import engine_child
    srv = start_server(adapters["base"], tmp_path / "server.log", "--adapter", f"a1={adapters['a1']}", "--set",
                       "engine.lora_target_modules=[q_proj, k_proj, v_proj, o_proj, gate_up_proj, down_proj]",
                       "--set", "restart.backoff_seconds=0.5")
    try:
        with LawchatClient(srv.target, retry=NO_RETRY, timeout=60) as c:
            c.load_adapter("a2", str(adapters["a2"]))
            before = c.chat(chat(QUESTIONS[1]), adapter="a2", temperature=0.0, max_new_tokens=N).text
            stream = c.chat_stream(chat(QUESTIONS[1]), adapter="a2", max_new_tokens=400, ignore_eos=True)
            parts = iter(stream)
            next(parts)
            os.kill(engine_child(srv), signal.SIGKILL)
            with pytest.raises(LawchatError) as e:
                "".join(parts)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
            deadline = time.monotonic() + 120
            while True:
                try:
                    answer = c.chat(chat(QUESTIONS[1]), adapter="a2", temperature=0.0, max_new_tokens=N)
                    if not answer.degraded:
                        break
                except LawchatError as err:        # while the engine restarts; anything else is a failure
                    if err.code != grpc.StatusCode.UNAVAILABLE:
                        raise
                assert time.monotonic() < deadline, "the engine did not come back"
                time.sleep(0.5)
            assert answer.text == before and {a["name"] for a in c.list_adapters()} == {"a1", "a2"}
    finally:
        srv.stop()
