"""The OpenAI-compatible HTTP API with the real clients people use: the official `openai` SDK (sync and async,
streaming and not, its error classes) and `curl -N` for SSE, against a real server on loopback whose gRPC port
answers the same question with the same greedy text."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess

import openai
import pytest
from lawchat_client import LawchatClient, NO_RETRY

from faults import InProcessServer
from lawchat_server.auth import AuthConfig
from lawchat_server.config import ServerConfig
from lawchat_server.engine.model_runner import load_runner
from lawchat_server.limiter import LimitsConfig, Rate
from lawchat_server.openai_api import HttpConfig
from test_auth import make_key

QUESTION = "劳动合同法第三十九条是怎么规定的？"
MODEL = "lawchat-tiny"


@pytest.fixture(scope="module")
def runner(tiny_model):
    return load_runner(tiny_model, device="cpu")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    (chat_key, chat_line), (admin_key, admin_line) = make_key("alice", "chat"), make_key("ops", "admin")
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"{chat_line}\n{admin_line}\n")
    return path, chat_key, admin_key


@pytest.fixture(scope="module")
def server(runner, keys):
    cfg = ServerConfig(port=0, auth=AuthConfig(keys_file=str(keys[0])),
                       http=HttpConfig(port=0, served_model_name=MODEL))
    srv = InProcessServer(runner, cfg)
    yield srv, f"http://127.0.0.1:{srv.app.http.port}/v1"
    srv.stop()


def grpc_answer(srv, key: str, n: int) -> tuple[str, int, int]:
    with LawchatClient(srv.target, api_key=key, retry=NO_RETRY, timeout=60) as c:
        r = c.chat(QUESTION, max_new_tokens=n)
    return r.text, r.prompt_tokens, r.completion_tokens


def test_sync_sdk_gets_the_grpc_answer_whole_and_streamed(server, keys):
    srv, base = server
    text, prompt_tokens, completion_tokens = grpc_answer(srv, keys[1], 12)
    client = openai.OpenAI(base_url=base, api_key=keys[1], max_retries=0)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=12,
                                       temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert r.choices[0].finish_reason in ("stop", "length") and r.model == MODEL
    assert r.lawchat == {"degraded": False, "citations": [], "no_governing_article": False}         # the extension field, read by the SDK
    assert r._request_id and r.id == f"chatcmpl-{r._request_id}"
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                                 max_completion_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == completion_tokens
    assert [m.id for m in client.models.list()] == [MODEL]
    assert srv.app.metrics.requests.labels("ChatCompletions", "OK")._value.get() >= 2   # one family, its own method


def test_async_sdk_streams_concurrently(server, keys):
    srv, base = server
    text, _, _ = grpc_answer(srv, keys[1], 8)

    async def go():
        client = openai.AsyncOpenAI(base_url=base, api_key=keys[1], max_retries=0)

        async def streamed():
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=8, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        async def whole():
            r = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                                     max_tokens=8)
            return r.choices[0].message.content
        return await asyncio.gather(*[streamed() for _ in range(3)], *[whole() for _ in range(3)])
    assert asyncio.run(asyncio.wait_for(go(), 120)) == [text] * 6


@pytest.mark.parametrize("kw, error, needle", [
    (dict(frequency_penalty=0.5), openai.BadRequestError, "'frequency_penalty' is not supported"),
    (dict(n=2), openai.BadRequestError, "only n=1"),
    (dict(temperature=3.0), openai.BadRequestError, "sampling.temperature must be in [0, 2]"),
    (dict(extra_body={"wibble": 1}), openai.BadRequestError, "unknown parameter 'wibble'"),
    (dict(extra_body={"top_k": 10**6}), openai.BadRequestError, "top_k"),
    (dict(stop=["a"] * 9), openai.BadRequestError, "at most 8 stop_sequences"),
    (dict(messages=[{"role": "tool", "content": "x"}]), openai.BadRequestError, "role must be one of"),
    (dict(model="gpt-4o"), openai.NotFoundError, "does not exist here"),
])
def test_requests_we_cannot_honour_are_refused_openai_style(server, keys, kw, error, needle):
    srv, base = server
    client = openai.OpenAI(base_url=base, api_key=keys[1], max_retries=0)
    args = dict(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=4) | kw
    with pytest.raises(error) as e:
        client.chat.completions.create(**args)
    assert needle in e.value.message


def test_keys_and_scopes_are_the_grpc_ones(server, keys):
    srv, base = server
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=base, api_key="lc_wrong", max_retries=0).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": QUESTION}])
    assert e.value.status_code == 401 and "Authorization: Bearer" in e.value.message
    with pytest.raises(openai.PermissionDeniedError) as e:              # an admin-only key has no chat scope
        openai.OpenAI(base_url=base, api_key=keys[2], max_retries=0).models.list()
    assert e.value.status_code == 403 and "'chat' scope" in e.value.message


def test_rate_limit_is_429_with_retry_after(runner):
    cfg = ServerConfig(port=0, http=HttpConfig(port=0), limits=LimitsConfig(client_requests=Rate(rate=0.5, burst=1)))
    srv = InProcessServer(runner, cfg)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.app.http.port}/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=1)
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=1)
        h = e.value.response.headers
        assert e.value.status_code == 429 and 1 <= int(h["retry-after"]) <= 2 and 0 < int(h["retry-after-ms"]) <= 2000
        assert srv.app.metrics.rate_limited.labels("client_requests")._value.get() == 1
    finally:
        srv.stop()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_server_sent_events(server, keys):
    srv, base = server
    text, _, _ = grpc_answer(srv, keys[1], 8)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8,
                       "stream": True}, ensure_ascii=False)
    r = subprocess.run(["curl", "-N", "-sS", "-H", f"Authorization: Bearer {keys[1]}", "-H",
                        "Content-Type: application/json", "-d", body, f"{base}/chat/completions"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    events = [line[6:] for line in r.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 3
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text


def test_degraded_answers_are_marked(server, keys):
    srv, base = server
    with LawchatClient(srv.target, api_key=keys[2], retry=NO_RETRY) as ops:
        ops.set_degraded(True, "maintenance")
        try:
            client = openai.OpenAI(base_url=base, api_key=keys[1], max_retries=0)
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}])
            assert r.lawchat["degraded"] is True and "12348" in r.choices[0].message.content
        finally:
            ops.set_degraded(False)


def test_lawchat_serve_flags_http_port_and_settings(tiny_model, tmp_path):
    """`lawchat serve --http-port 0 --max-model-len 256 --max-num-seqs 8 --set limits.client_requests.rate=50`:
    the ready line names the OpenAI base URL, each flag lands in its config key, SIGTERM stops both ports."""
    import re

    from conftest import start_server
    srv = start_server(tiny_model, tmp_path / "serve.log", "--http-port", "0", "--served-model-name", MODEL,
                       "--max-model-len", "256", "--max-num-seqs", "8", "--set", "limits.client_requests.rate=50",
                       "--set", "breaker.failure_threshold=7")
    try:
        base = re.search(r"openai=(\S+)", "".join(srv.stdout_lines)).group(1)
        client = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=3)
        assert r.usage.completion_tokens >= 1
        with LawchatClient(srv.target, retry=NO_RETRY) as c:
            st = c.status()
        assert st["engine"]["max_len"] == 256 and st["limits"]["client_requests"]["rate"] == 50
        assert st["breaker"]["failure_threshold"] == 7
        with pytest.raises(openai.BadRequestError) as e:                 # max_model_len is enforced
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "法" * 400}])
        assert "this model takes at most 255" in e.value.message
    finally:
        assert srv.stop() == 0
    from conftest import BIN
    r = subprocess.run([str(BIN / "lawchat"), "serve", "--model", str(tiny_model), "--port", "0", "--set",
                        "limits.nonsense=1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown keys ['nonsense']" in r.stderr


def test_hostile_bodies_get_a_4xx_and_the_server_goes_on(server, keys, tmp_path):
    """Oversized, malformed, deeply nested and NaN-laden bodies: each a clear 4xx, none a 500, then normal service."""
    import urllib.error
    import urllib.request
    srv, base = server

    def post(data: bytes) -> tuple[int, dict]:
        req = urllib.request.Request(f"{base}/chat/completions", data=data, method="POST",
                                     headers={"Authorization": f"Bearer {keys[1]}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
    cases = [(b"{not json", 400), (b"[" * 100000 + b"]" * 100000, 400), (b"[]", 400),
             (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "问"}],
                          "temperature": float("nan")}).encode(), 400),
             (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "问"}], "seed": 2**64}).encode(), 400),
             (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "问"}], "max_tokens": True}).encode(), 400)]
    for data, status in cases:
        got, body = post(data)
        assert got == status and body["error"]["message"], (data[:40], got, body)
    if shutil.which("curl"):       # a body past the cap is refused from its Content-Length, before it is read
        big = tmp_path / "big.json"
        big.write_bytes(b"x" * (max(4 << 20, 4 * srv.app.chat.cfg.generation.max_request_bytes) + 1))
        r = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Authorization: Bearer {keys[1]}",
                            "-H", "Content-Type: application/json", "--data-binary", f"@{big}", f"{base}/chat/completions"],
                           capture_output=True, text=True, timeout=60)
        assert r.stdout == "413", r.stdout + r.stderr
    got, body = post(json.dumps({"model": MODEL, "messages": [{"role": "user", "content": QUESTION}],
                                 "max_tokens": 2}).encode())
    assert got == 200 and body["usage"]["completion_tokens"] >= 1
