"""Statute-grounded answers over a real in-process server: articles retrieved into the prompt, citations on the final
message and the unary response, the CLI's --cite, and degraded answers that still quote the articles."""
from __future__ import annotations

import json
import re
import subprocess

import grpc
import pytest
from lawchat_client import LawchatClient, LawchatError, NO_RETRY

from conftest import BIN
from faults import FaultyRunner, InProcessServer
from lawchat_server.config import ServerConfig
from lawchat_server.degraded import DEFAULT_MESSAGE
from lawchat_server.engine.model_runner import load_runner
from lawchat_server.prompt import CONTEXT_HEADER, with_context
from lawchat_server.retrieval import RetrievalConfig, build_index
from test_retrieval import laws_db  # noqa: F401  (the laws.db-format fixture)

QUESTION = "公司拖欠工资三个月了，我该怎么办？"


@pytest.fixture(scope="module")
def runner(tiny_model):
    return load_runner(tiny_model, device="cpu")


@pytest.fixture(scope="module")
def index(laws_db, tmp_path_factory):  # noqa: F811
    path = tmp_path_factory.mktemp("idx") / "laws.sqlite"
    build_index(path, laws_db)
    return path


@pytest.fixture(scope="module")
def server(runner, index):
    faulty = FaultyRunner(runner)
    srv = InProcessServer(faulty, ServerConfig(port=0, retrieval=RetrievalConfig(index=str(index), top_k=2)))
    yield srv, faulty
    srv.stop()


def test_retrieval_puts_articles_in_the_prompt_and_cites_them(server):
    srv, _ = server
    with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c:
        plain = c.chat_stream(QUESTION, max_new_tokens=4, ignore_eos=True)
        assert "".join(plain) is not None and plain.citations == []            # off by default
        stream = c.chat_stream(QUESTION, max_new_tokens=4, ignore_eos=True, retrieval=True)
        "".join(stream)
        assert [(x["law"], x["article"]) for x in stream.citations][0] == ("劳动合同法", "第三十条")
        assert len(stream.citations) <= 2 and "劳动报酬" in stream.citations[0]["snippet"]
        assert stream.prompt_tokens > plain.prompt_tokens + 20                  # the articles are in the prompt
        unary = c.chat(QUESTION, max_new_tokens=4, ignore_eos=True, retrieval=True, retrieval_top_k=1)
        assert [(x["law"], x["article"]) for x in unary.citations] == [("劳动合同法", "第三十条")]
        with pytest.raises(LawchatError) as e:
            c.chat(QUESTION, retrieval=True, retrieval_top_k=11)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in e.value.details


def test_degraded_answers_still_quote_the_articles(server):
    srv, faulty = server
    with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c:
        c.set_degraded(True, "test")
        try:
            calls = faulty.calls
            stream = c.chat_stream(QUESTION, retrieval=True)
            text = "".join(stream)
            assert stream.degraded and stream.finish_reason == "degraded" and faulty.calls == calls   # no model
            assert text.startswith(DEFAULT_MESSAGE)
            assert "《劳动合同法》第三十条：用人单位应当按照劳动合同约定和国家规定" in text      # verbatim
            assert stream.citations[0]["article"] == "第三十条"
        finally:
            c.set_degraded(False)


def test_retrieval_on_a_server_without_an_index_is_failed_precondition(runner):
    srv = InProcessServer(runner)
    try:
        with LawchatClient(srv.target, timeout=30, retry=NO_RETRY) as c:
            with pytest.raises(LawchatError) as e:
                c.chat(QUESTION, retrieval=True)
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "retrieval.index" in e.value.details
            assert c.chat(QUESTION, max_new_tokens=2, ignore_eos=True).citations == []
    finally:
        srv.stop()


def test_client_cli_cite_prints_the_articles(server):
    srv, _ = server
    r = subprocess.run([str(BIN / "lawchat-client"), "--target", srv.target, "chat", QUESTION, "--max-new-tokens", "3",
                        "--cite"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "引用法条" in r.stdout and "[1] 《劳动合同法》第三十条：用人单位应当" in r.stdout


def test_grpcurl_shows_the_citations(server):
    srv, _ = server
    body = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "retrieval": {"enabled": True, "top_k": 2},
                       "stopping": {"max_new_tokens": 3}}, ensure_ascii=False)
    r = subprocess.run([str(BIN / "grpcurl"), "-plaintext", "-d", body, srv.target,
                        "lawchat.v1.ChatService/ChatStream"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    last = json.loads(re.findall(r"^\{.*?^\}", r.stdout, re.S | re.M)[-1])
    assert [(c["law"], c["article"]) for c in last["citations"]][0] == ("劳动合同法", "第三十条")
    assert len(last["citations"]) == 2 and last["citations"][0]["snippet"] and "score" in last["citations"][0]


def test_corrupt_or_missing_index_stops_the_server_at_start(tiny_model, tmp_path):
    bad = tmp_path / "corrupt.sqlite"
    bad.write_bytes(b"not an index" * 100)
    for path, needle in ((bad, "not a lawchat retrieval index"), (tmp_path / "missing.sqlite", "no such file")):
        r = subprocess.run([str(BIN / "lawchat"), "serve", "--model", str(tiny_model), "--port", "0",
                            "--metrics-port", "0", "--retrieval-index", str(path)], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and needle in r.stderr, r.stderr[-2000:]


def test_context_stays_within_the_token_budget(runner):
    tok = runner.tokenizer
    articles = [("《劳动合同法》第三十条", "用人单位应当按时足额支付劳动报酬。" * 20), ("《劳动法》第五十条", "工资应当按月支付。")]
    msgs = [{"role": "user", "content": QUESTION}]
    sizes = []
    for budget in (40, 120, 400):
        out = with_context(msgs, articles, tok, budget)
        content = out[-1]["content"]
        block = content[: content.index("\n\n问题：")]
        assert block.startswith(CONTEXT_HEADER) and content.endswith("问题：" + QUESTION)
        sizes.append(len(block))
        assert len(tok.encode(block, add_special_tokens=False)) <= budget
    assert sizes[0] < sizes[1] < sizes[2] and "《劳动法》第五十条" in block     # the budget is used, not wasted
    assert with_context(msgs, articles, tok, 0) == msgs and with_context(msgs, [], tok, 100) == msgs


def test_openai_api_carries_the_same_citations(runner, index):
    """The OpenAI-compatible API's `lawchat.citations` extension: the gRPC citations of the same question, and the
    drain's 503 on the same request path."""
    import openai

    from lawchat_server.openai_api import HttpConfig
    srv = InProcessServer(runner, ServerConfig(port=0, retrieval=RetrievalConfig(index=str(index), top_k=2),
                                               http=HttpConfig(port=0, served_model_name="m")))
    try:
        with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c:
            want = c.chat(QUESTION, max_new_tokens=4, retrieval=True).citations
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.app.http.port}/v1", api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": QUESTION}]
        r = client.chat.completions.create(model="m", messages=msgs, max_tokens=4,
                                           extra_body={"retrieval": {"enabled": True}})
        assert [(x["law"], x["article"]) for x in r.lawchat["citations"]] == [(x["law"], x["article"]) for x in want]
        assert r.lawchat["citations"][0]["snippet"] == want[0]["snippet"]
        chunks = list(client.chat.completions.create(model="m", messages=msgs, max_tokens=4, stream=True,
                                                     extra_body={"retrieval": {"enabled": True, "top_k": 1}}))
        assert [(x["law"], x["article"]) for x in chunks[-1].lawchat["citations"]] == [("劳动合同法", "第三十条")]
        with LawchatClient(srv.target, retry=NO_RETRY) as c:
            c.drain(timeout_seconds=0.1)
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model="m", messages=msgs, max_tokens=4)
        assert e.value.status_code == 503 and "draining" in e.value.message
    finally:
        srv.stop()
