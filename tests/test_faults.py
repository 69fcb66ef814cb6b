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
from lawchat_client import LawchatClient, LawchatError, NO_RETRY

from faults import FaultyRunner, InProcessServer, count, engine_of, wait_until
from lawchat_server.prompt import encode_prompt
from lawchat_server.engine.model_runner import load_runner

QUESTION = "劳动合同法第三十九条是怎么规定的？"


@pytest.fixture(scope="module")
def runner(tiny_model):
    return load_runner(tiny_model, device="cpu")


@pytest.fixture
def slow(runner):
    faulty = FaultyRunner(runner, delay=0.02)
    srv = InProcessServer(faulty, max_waiting=1, max_num_seqs=1)
    yield srv, faulty
    srv.stop()


def test_client_cancel_stops_generation_and_frees_the_slot(slow):
    srv, faulty = slow
    with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c:
        stream = c.chat_stream(QUESTION, max_new_tokens=400, ignore_eos=True)   # ~8 s of steps if not cancelled
        it = iter(stream)
        next(it)
        at_cancel = faulty.decoded
        stream.cancel()
        assert wait_until(lambda: engine_of(srv).running == 0)
        freed_after = faulty.decoded - at_cancel
        assert freed_after <= 3                       # freed within a few 20 ms steps of the cancel, not at the end
        time.sleep(0.3)
        assert faulty.decoded == at_cancel + freed_after   # and no decoding since for a client that left
        assert wait_until(lambda: count(srv, "ChatStream", "CANCELLED") == 1)
        assert c.chat(QUESTION, max_new_tokens=3, ignore_eos=True).completion_tokens == 3


def test_deadline_exceeded_frees_the_slot(slow):
    srv, faulty = slow
    with LawchatClient(srv.target, retry=NO_RETRY) as c:
        with pytest.raises(LawchatError) as e:
            list(c.chat_stream(QUESTION, max_new_tokens=400, timeout=2.0, ignore_eos=True))   # needs ~8 s
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_until(lambda: engine_of(srv).running == 0)
        assert wait_until(lambda: count(srv, "ChatStream", "DEADLINE_EXCEEDED") == 1)
        assert c.chat(QUESTION, max_new_tokens=2, ignore_eos=True).finish_reason == "max_tokens"


def test_overload_gets_resource_exhausted_with_retry_after(slow):
    srv, _ = slow
    with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c, ThreadPoolExecutor(2) as pool:
        first = pool.submit(lambda: c.chat(QUESTION, max_new_tokens=60, ignore_eos=True))       # running
        assert wait_until(lambda: engine_of(srv).running == 1)
        second = pool.submit(lambda: c.chat(QUESTION, max_new_tokens=5, ignore_eos=True))   # waiting (max_waiting=1)
        assert wait_until(lambda: engine_of(srv).waiting == 1)
        with pytest.raises(LawchatError) as e:
            c.chat(QUESTION, max_new_tokens=5)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.value.retry_after == 1.0
        assert first.result().completion_tokens == 60 and second.result().completion_tokens == 5


def test_engine_error_is_internal_and_server_keeps_serving(runner):
    srv = InProcessServer(FaultyRunner(runner, fail_steps=1))
    try:
        with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c:
            with pytest.raises(LawchatError) as e:
                list(c.chat_stream(QUESTION, max_new_tokens=5, request_id="boom-1"))
            assert e.value.code == grpc.StatusCode.INTERNAL
            assert "boom-1" in e.value.details and "memory" not in e.value.details
            assert c.chat(QUESTION, max_new_tokens=4, ignore_eos=True).completion_tokens == 4
    finally:
        srv.stop()


def test_shutdown_refuses_new_while_in_flight_finish(runner):
    srv = InProcessServer(FaultyRunner(runner, delay=0.02))
    with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c, ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(lambda: c.chat(QUESTION, max_new_tokens=150, ignore_eos=True))   # ~3 s
        assert wait_until(lambda: engine_of(srv).running == 1)
        stopper = threading.Thread(target=srv.stop, kwargs={"grace": 30})
        stopper.start()
        assert wait_until(lambda: srv.app.chat.stopping)
        with pytest.raises(LawchatError) as e:          # refused while the in-flight stream still runs
            c.chat(QUESTION, max_new_tokens=2, timeout=5)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert not in_flight.done() and engine_of(srv).running == 1
        result = in_flight.result(60)
        assert (result.finish_reason, result.completion_tokens) == ("max_tokens", 150)   # finished, not cut
        stopper.join(60)


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
        with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c:
            with pytest.raises(LawchatError) as e:
                c.chat([("system", "你是律师"), ("user", QUESTION)], max_new_tokens=3)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "System role not supported" in e.value.details
            assert wait_until(lambda: count(srv, "Chat", "INVALID_ARGUMENT") == 1)
            assert c.chat(QUESTION, max_new_tokens=3, ignore_eos=True).completion_tokens == 3
    finally:
        srv.stop()
