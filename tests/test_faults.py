"""Fault injection on a real in-process gRPC server: a slow or failing model runner around the tiny model.

Cancel, deadline, overload, engine errors and shutdown must each end the RPC with the right status and
leave the server serving (or, on shutdown, finish in-flight streams first).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from lawchat_client import LawchatClient, LawchatError

from lawchat_server.app import ThreadedServer
from lawchat_server.config import ServerConfig
from lawchat_server.prompt import encode_prompt
from lawchat_server.engine.config import EngineConfig
from lawchat_server.engine.engine import Engine
from lawchat_server.engine.model_runner import load_runner

QUESTION = "劳动合同法第三十九条是怎么规定的？"


class FaultyRunner:
    """The real runner, with a delay per engine step and optional failing steps."""

    def __init__(self, runner, delay: float = 0.0, fail_steps: int = 0):
        self.inner, self.delay, self.fail_steps = runner, delay, fail_steps
        self.decoded = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def execute(self, prefill, decode):
        if self.fail_steps > 0:
            self.fail_steps -= 1
            raise RuntimeError("CUDA out of memory (injected)")
        time.sleep(self.delay)
        self.decoded += len(decode)
        return self.inner.execute(prefill, decode)


def InProcessServer(runner, **engine_cfg) -> ThreadedServer:
    return ThreadedServer(Engine(runner, EngineConfig(**engine_cfg)), ServerConfig(port=0), "tiny")


def count(srv: ThreadedServer, method: str, code: str) -> float:
    return srv.app.metrics.requests.labels(method, code)._value.get()


@pytest.fixture(scope="module")
def runner(tiny_model):
    return load_runner(tiny_model, device="cpu")


@pytest.fixture
def slow(runner):
    faulty = FaultyRunner(runner, delay=0.02)
    srv = InProcessServer(faulty, max_waiting=1, max_num_seqs=1)
    yield srv, faulty
    srv.stop()


def wait_until(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_client_cancel_stops_generation_and_frees_the_slot(slow):
    srv, faulty = slow
    with LawchatClient(srv.target, timeout=60) as c:
        stream = c.chat_stream(QUESTION, max_new_tokens=400)
        it = iter(stream)
        next(it)
        stream.cancel()
        assert wait_until(lambda: srv.app.engine.running == 0)
        stopped_at = faulty.decoded
        time.sleep(0.3)
        assert faulty.decoded <= stopped_at + 1          # no decoding for a client that left
        assert stopped_at < 100
        assert wait_until(lambda: count(srv, "ChatStream", "CANCELLED") == 1)
        assert c.chat(QUESTION, max_new_tokens=3).completion_tokens == 3


def test_deadline_exceeded_frees_the_slot(slow):
    srv, faulty = slow
    with LawchatClient(srv.target) as c:
        with pytest.raises(LawchatError) as e:
            list(c.chat_stream(QUESTION, max_new_tokens=400, timeout=2.0))   # generation needs ~8 s
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_until(lambda: srv.app.engine.running == 0)
        assert wait_until(lambda: count(srv, "ChatStream", "DEADLINE_EXCEEDED") == 1)
        assert c.chat(QUESTION, max_new_tokens=2).finish_reason in ("max_tokens", "eos")


def test_overload_gets_resource_exhausted_with_retry_after(slow):
    srv, _ = slow
    with LawchatClient(srv.target, timeout=60) as c, ThreadPoolExecutor(2) as pool:
        first = pool.submit(lambda: c.chat(QUESTION, max_new_tokens=60))       # running
        assert wait_until(lambda: srv.app.engine.running == 1)
        second = pool.submit(lambda: c.chat(QUESTION, max_new_tokens=5))       # waiting (max_waiting=1)
        assert wait_until(lambda: srv.app.engine.waiting == 1)
        with pytest.raises(LawchatError) as e:
            c.chat(QUESTION, max_new_tokens=5)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.value.retry_after == 1.0
        assert first.result().completion_tokens >= 1 and second.result().completion_tokens >= 1


def test_engine_error_is_internal_and_server_keeps_serving(runner):
    srv = InProcessServer(FaultyRunner(runner, fail_steps=1))
    try:
        with LawchatClient(srv.target, timeout=60) as c:
            with pytest.raises(LawchatError) as e:
                list(c.chat_stream(QUESTION, max_new_tokens=5, request_id="boom-1"))
            assert e.value.code == grpc.StatusCode.INTERNAL
            assert "boom-1" in e.value.details and "memory" not in e.value.details
            assert c.chat(QUESTION, max_new_tokens=4).completion_tokens == 4
    finally:
        srv.stop()


def test_shutdown_drains_in_flight_and_refuses_new(runner):
    srv = InProcessServer(FaultyRunner(runner, delay=0.02))
    with LawchatClient(srv.target, timeout=60) as c, ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(lambda: c.chat(QUESTION, max_new_tokens=40))
        assert wait_until(lambda: srv.app.engine.running == 1)
        stopper = threading.Thread(target=srv.stop, kwargs={"grace": 30})
        stopper.start()
        result = in_flight.result(60)
        assert result.finish_reason in ("max_tokens", "eos")    # the stream finished, not cut
        stopper.join(60)
        with pytest.raises(LawchatError) as e:
            c.chat(QUESTION, max_new_tokens=2, timeout=5)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE


class StrictTokenizer:
    """A tokenizer whose chat template refuses a system turn, as some real templates do."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def apply_chat_template(self, messages, **kw):
        if messages[0]["role"] == "system":
            import jinja2
            raise jinja2.TemplateError("System role not supported")
        return self.inner.apply_chat_template(messages, **kw)


class StrictTemplateRunner(FaultyRunner):
    def encode_chat(self, messages):
        return encode_prompt(StrictTokenizer(self.inner.tokenizer), messages)


def test_template_rejection_is_invalid_argument(runner):
    srv = InProcessServer(StrictTemplateRunner(runner))
    try:
        with LawchatClient(srv.target, timeout=60) as c:
            with pytest.raises(LawchatError) as e:
                c.chat([("system", "你是律师"), ("user", QUESTION)], max_new_tokens=3)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "System role not supported" in e.value.details
            assert wait_until(lambda: count(srv, "Chat", "INVALID_ARGUMENT") == 1)
            assert c.chat(QUESTION, max_new_tokens=3).completion_tokens == 3
    finally:
        srv.stop()
