"""The client SDK against real gRPC servers on loopback: retries (a scripted servicer injects the faults), the
asyncio client, round_robin with health checking over two real replicas, and the multi-turn CLI."""
from __future__ import annotations

import asyncio
import random
import re
import subprocess
import time
import urllib.request
from concurrent import futures

import grpc
import pytest
from lawchat.v1 import chat_pb2, chat_pb2_grpc
from lawchat_client import NO_RETRY, AsyncLawchatClient, LawchatClient, LawchatError, RetryPolicy

from conftest import BIN, start_server

FAST = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)


class Scripted(chat_pb2_grpc.ChatServiceServicer):
    """Each call takes the next action: ("fail", code, retry_after_ms) | ("text_then_fail", code) | ("ok", text)."""

    def __init__(self):
        self.actions: list[tuple] = []
        self.calls = 0

    def _next(self, context):
        self.calls += 1
        action = self.actions.pop(0) if self.actions else ("ok", "答复")
        if action[0] == "fail":
            if action[2] is not None:
                context.set_trailing_metadata([("retry-after-ms", str(action[2]))])
            context.abort(action[1], "scripted failure")
        return action

    def Chat(self, request, context):
        action = self._next(context)
        return chat_pb2.ChatResponse(text=action[1], finish_reason=chat_pb2.FINISH_REASON_EOS_TOKEN)

    def ChatStream(self, request, context):
        action = self._next(context)
        if action[0] == "text_then_fail":
            yield chat_pb2.ChatStreamResponse(delta="部分")
            context.abort(action[1], "scripted failure after text")
        yield chat_pb2.ChatStreamResponse(delta=action[1])
        yield chat_pb2.ChatStreamResponse(finish_reason=chat_pb2.FINISH_REASON_EOS_TOKEN)


@pytest.fixture
def scripted():
    servicer = Scripted()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    chat_pb2_grpc.add_ChatServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_backoff_is_jittered_exponential_and_honours_retry_after():
    p = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0)
    rng = random.Random(0)
    for attempt, cap in ((1, 0.1), (2, 0.2), (3, 0.4), (5, 1.0), (9, 1.0)):
        waits = [p.backoff(attempt, rng=rng) for _ in range(300)]
        assert 0 <= min(waits) and max(waits) <= cap
        assert max(waits) > 0.8 * cap and min(waits) < 0.2 * cap        # spread over [0, cap]: jitter
    assert p.backoff(1, retry_after=0.7, rng=rng) >= 0.7                 # the server's hint is a floor
    assert p.backoff(1, retry_after=30, rng=rng) == 1.0                  # capped at max_backoff


@pytest.mark.parametrize("code, hint", [(grpc.StatusCode.UNAVAILABLE, None), (grpc.StatusCode.RESOURCE_EXHAUSTED, 150)])
def test_unary_and_stream_retry_retryable_codes(scripted, code, hint):
    servicer, target = scripted
    with LawchatClient(target, retry=FAST) as client:
        servicer.actions = [("fail", code, hint), ("fail", code, hint), ("ok", "第一")]
        t0 = time.monotonic()
        assert client.chat("问").text == "第一"
        assert servicer.calls == 3
        if hint:                                     # two waits of at least the 150 ms hint (capped at 50 ms here)
            assert time.monotonic() - t0 >= 2 * 0.05
        servicer.actions = [("fail", code, hint), ("ok", "第二")]
        stream = client.chat_stream("问")
        assert "".join(stream) == "第二" and stream.attempts == 2 and stream.finish_reason == "eos"
        servicer.calls = 0
        servicer.actions = [("fail", code, hint)] * 5
        with pytest.raises(LawchatError) as e:
            client.chat("问")
        assert e.value.code == code and e.value.attempts == 4 and servicer.calls == 4


def test_no_retry_on_client_errors_after_text_or_when_off(scripted):
    servicer, target = scripted
    with LawchatClient(target, retry=FAST) as client:
        for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                     grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.DEADLINE_EXCEEDED):
            servicer.calls, servicer.actions = 0, [("fail", code, None), ("ok", "x")]
            with pytest.raises(LawchatError) as e:
                client.chat("问")
            assert e.value.code == code and servicer.calls == 1
        servicer.calls, servicer.actions = 0, [("text_then_fail", grpc.StatusCode.UNAVAILABLE), ("ok", "x")]
        got = []
        with pytest.raises(LawchatError) as e:
            for delta in client.chat_stream("问"):
                got.append(delta)
        assert got == ["部分"] and e.value.code == grpc.StatusCode.UNAVAILABLE and servicer.calls == 1
    with LawchatClient(target, retry=NO_RETRY) as client:
        servicer.calls, servicer.actions = 0, [("fail", grpc.StatusCode.UNAVAILABLE, None), ("ok", "x")]
        with pytest.raises(LawchatError):
            client.chat("问")
        assert servicer.calls == 1


def test_retries_stop_at_the_deadline(scripted):
    servicer, target = scripted
    slow = RetryPolicy(max_attempts=50, initial_backoff=0.2, max_backoff=0.2)
    with LawchatClient(target, retry=slow, timeout=0.5) as client:
        servicer.actions = [("fail", grpc.StatusCode.RESOURCE_EXHAUSTED, 200)] * 50
        t0 = time.monotonic()
        with pytest.raises(LawchatError) as e:
            client.chat("问")
        # no sleep that would end past the deadline: the caller gets the server's error, in time
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - t0 < 0.5
        assert 2 <= servicer.calls <= 3


def test_async_client_retries_like_the_sync_one(scripted):
    servicer, target = scripted

    async def run():
        async with AsyncLawchatClient(target, retry=FAST) as client:
            servicer.actions = [("fail", grpc.StatusCode.UNAVAILABLE, None), ("ok", "甲")]
            assert (await client.chat("问")).text == "甲"
            servicer.actions = [("fail", grpc.StatusCode.RESOURCE_EXHAUSTED, 10), ("ok", "乙")]
            stream = client.chat_stream("问")
            assert "".join([d async for d in stream]) == "乙" and stream.attempts == 2
            servicer.actions = [("text_then_fail", grpc.StatusCode.UNAVAILABLE)]
            with pytest.raises(LawchatError):
                async for _ in client.chat_stream("问"):
                    pass
            servicer.actions = [("fail", grpc.StatusCode.INVALID_ARGUMENT, None)]
            with pytest.raises(LawchatError) as e:
                await client.chat("问")
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    servicer.calls = 0
    asyncio.run(run())
    assert servicer.calls == 2 + 2 + 1 + 1


@pytest.mark.slow
def test_async_client_streams_the_same_answer_as_the_sync_one(server):
    q = "劳动合同法第三十九条是怎么规定的？"
    with LawchatClient(server.target) as client:
        sync_text = "".join(client.chat_stream(q, max_new_tokens=24))
        sync_unary = client.chat(q, max_new_tokens=24)

    async def run():
        async with AsyncLawchatClient(server.target) as client:
            stream = client.chat_stream(q, max_new_tokens=24)
            text = "".join([d async for d in stream])
            return text, stream, await client.chat(q, max_new_tokens=24), await client.status()
    text, stream, unary, status = asyncio.run(run())
    assert text == sync_text == unary.text == sync_unary.text and text
    assert stream.completion_tokens == unary.completion_tokens == 24 and stream.finish_reason == "max_tokens"
    assert status["model"]


def requests_served(srv) -> float:
    """ChatStream / Chat calls this replica answered, any status (its own /metrics)."""
    body = urllib.request.urlopen(srv.metrics_url, timeout=5).read().decode()
    return sum(float(v) for v in re.findall(r'^lawchat_requests_total\{[^}]*method="Chat(?:Stream|Completions)?"[^}]*\} (\S+)',
                                            body, re.M))


@pytest.mark.slow
def test_round_robin_over_replicas_skips_one_that_is_not_serving(tiny_model, tmp_path):
    a = start_server(tiny_model, tmp_path / "a.log")
    b = start_server(tiny_model, tmp_path / "b.log")
    try:
        with LawchatClient([a.target, b.target], retry=NO_RETRY) as client:
            for _ in range(8):
                assert client.chat("试用期最长多久？", max_new_tokens=4).completion_tokens == 4
            assert requests_served(a) >= 2 and requests_served(b) >= 2      # spread over both
            client.drain(timeout_seconds=0.1, timeout=10)                   # one of them drains: NOT_SERVING
            drained = a if LawchatClient(a.target).status()["draining"] else b
            other = b if drained is a else a
            time.sleep(1.0)                                                  # the health watch reports it
            before_drained, before_other = requests_served(drained), requests_served(other)
            for _ in range(8):                                               # no retries: each must hit `other`
                assert client.chat("试用期最长多久？", max_new_tokens=4).completion_tokens == 4
            assert requests_served(drained) == before_drained
            assert requests_served(other) == before_other + 8
    finally:
        a.stop()
        b.stop()


@pytest.mark.slow
def test_cli_chat_interactive_keeps_the_history(server, tiny_model):
    from transformers import AutoTokenizer

    from lawchat_server.prompt import encode_prompt
    q1, q2 = "试用期最长可以约定多久？", "那工资呢？"
    r = subprocess.run([str(BIN / "lawchat-client"), "--target", server.target, "chat", "-i", "--max-new-tokens", "10",
                        "--usage"], input=f"{q1}\n{q2}\n\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    answers = r.stdout.splitlines()
    prompts = [int(n) for n in re.findall(r"prompt_tokens=(\d+)", r.stderr)]
    assert len(answers) == 2 and len(prompts) == 2
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert prompts[0] == len(encode_prompt(tok, [{"role": "user", "content": q1}]))
    history = [{"role": "user", "content": q1}, {"role": "assistant", "content": answers[0]},
               {"role": "user", "content": q2}]
    assert prompts[1] == len(encode_prompt(tok, history))      # turn 2 carried turn 1 and its answer


def test_cli_chat_needs_a_question_or_interactive():
    r = subprocess.run([str(BIN / "lawchat-client"), "chat"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "-i" in r.stderr


def test_unknown_chat_option_is_a_type_error(scripted):
    _, target = scripted
    with LawchatClient(target) as client:
        with pytest.raises(TypeError, match="max_tokens"):
            client.chat("问", max_tokens=5)
