"""Production guards on a real in-process gRPC server (tiny model): rate limits, the circuit breaker and its
canned answer, the degraded switch, ReloadModel, Drain. Every wait is bounded."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lawchat.v1 import chat_pb2, chat_pb2_grpc
from lawchat_client import LawchatClient, LawchatError, NO_RETRY

from faults import Clock, FaultyRunner, InProcessServer, engine_of, wait_until
from lawchat_server.breaker import BreakerConfig
from lawchat_server.config import ServerConfig
from lawchat_server.degraded import DEFAULT_MESSAGE
from lawchat_server.engine.config import EngineConfig
from lawchat_server.engine.engine import Engine, generate_batch
from lawchat_server.engine.model_runner import load_runner
from lawchat_server.limiter import LimitsConfig, Rate

QUESTION = "劳动合同法第三十九条是怎么规定的？"


@pytest.fixture(scope="module")
def runner(tiny_model):
    return load_runner(tiny_model, device="cpu")


def greedy_text(runner, n: int) -> str:
    engine = Engine(runner, EngineConfig())
    engine.start()
    try:
        ids = runner.encode_chat([{"role": "user", "content": QUESTION}])
        return generate_batch(engine, [ids], n, ignore_eos=True)[0].delta
    finally:
        engine.stop()


# -- rate limits ------------------------------------------------------------------------------------------
async def one_stream(target: str, rid: str) -> tuple[str, dict, list]:
    """One client with its own channel: (status code name, trailing metadata, messages)."""
    async with grpc.aio.insecure_channel(target) as ch:
        call = chat_pb2_grpc.ChatServiceStub(ch).ChatStream(
            chat_pb2.ChatStreamRequest(messages=[chat_pb2.Message(role="user", content=QUESTION)],
                                       stopping=chat_pb2.StoppingCriteria(max_new_tokens=2, ignore_eos=True)),
            metadata=(("x-request-id", rid),), timeout=60)
        msgs = []
        try:
            async for m in call:
                msgs.append(m)
        except grpc.aio.AioRpcError:
            pass
        return (await call.code()).name, dict(await call.trailing_metadata() or ()), msgs


def test_200_concurrent_clients_against_small_limits(runner):
    cfg = ServerConfig(port=0, limits=LimitsConfig(global_requests=Rate(rate=5, burst=40)))
    srv = InProcessServer(runner, cfg)
    try:
        async def flood():
            return await asyncio.gather(*(one_stream(srv.target, f"c{i}") for i in range(200)))
        results = asyncio.run(asyncio.wait_for(flood(), 120))
        codes = [code for code, _, _ in results]
        ok, refused = codes.count("OK"), codes.count("RESOURCE_EXHAUSTED")
        assert ok + refused == 200, sorted(set(codes))           # every stream ended with one of the two
        assert 40 <= ok < 100 and refused > 100                  # the burst, plus what refilled meanwhile
        for code, trailing, msgs in results:
            if code == "OK":                                     # a complete answer with its final message
                assert msgs[-1].finish_reason == chat_pb2.FINISH_REASON_MAX_TOKENS
                assert msgs[-1].usage.completion_tokens == 2
            else:                                                # refused before any text, with a usable hint
                assert not msgs
                assert 0 < int(trailing["retry-after-ms"]) <= 200 + 5   # one token at 5/s: at most 200 ms
        m = srv.app.metrics
        assert m.admitted._value.get() == ok
        assert m.rate_limited.labels("global_requests")._value.get() == refused
        # a refused client that waits its own hint gets in (no one else competes for the bucket now)
        async def refused_then_retry():
            for _ in range(50):                      # empty the bucket until this client is refused
                code, trailing, _ = await one_stream(srv.target, "late")
                if code == "RESOURCE_EXHAUSTED":
                    break
            assert code == "RESOURCE_EXHAUSTED"
            await asyncio.sleep(int(trailing["retry-after-ms"]) / 1000)
            return await one_stream(srv.target, "late-retry")
        code, _, msgs = asyncio.run(asyncio.wait_for(refused_then_retry(), 60))
        assert code == "OK" and msgs[-1].usage.completion_tokens == 2
    finally:
        srv.stop()


def test_generated_tokens_are_charged_as_they_stream(runner):
    cfg = ServerConfig(port=0, limits=LimitsConfig(client_tokens=Rate(rate=40, burst=40)))
    srv = InProcessServer(runner, cfg)
    try:
        with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c:
            assert c.chat(QUESTION, max_new_tokens=80, ignore_eos=True).completion_tokens == 80   # admitted at 40
            with pytest.raises(LawchatError) as e:      # 80 tokens paid from a bucket of 40: 40 in debt
                c.chat(QUESTION, max_new_tokens=1)
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "client_tokens" in e.value.details
            assert 0.2 < e.value.retry_after <= 1.0     # the debt of 40 at 40/s, less the time since
            time.sleep(e.value.retry_after)
            assert c.chat(QUESTION, max_new_tokens=1).completion_tokens == 1
    finally:
        srv.stop()


def test_update_limits_at_run_time(runner):
    cfg = ServerConfig(port=0, limits=LimitsConfig(client_requests=Rate(rate=0.1, burst=1)))
    srv = InProcessServer(runner, cfg)
    try:
        with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c:
            c.chat(QUESTION, max_new_tokens=1)
            with pytest.raises(LawchatError) as e:
                c.chat(QUESTION, max_new_tokens=1)
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.value.retry_after > 5
            limits = c.update_limits(client_requests={"rate": 100})       # burst left unset: unchanged
            assert limits["client_requests"] == {"rate": 100.0, "burst": 1.0}
            assert c.status()["limits"]["client_requests"]["rate"] == 100.0
            time.sleep(0.02)
            assert c.chat(QUESTION, max_new_tokens=1).completion_tokens == 1
            with pytest.raises(LawchatError) as e:
                c.update_limits(global_tokens={"rate": -5})
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        srv.stop()


# -- circuit breaker ----------------------------------------------------------------------------------------
def ask(c: LawchatClient, n: int = 3, **kw):
    stream = c.chat_stream(QUESTION, max_new_tokens=n, ignore_eos=True, **kw)
    text = "".join(stream)
    return stream, text


def breaker_state(c: LawchatClient) -> str:
    return c.status()["breaker"]["state"]


def test_breaker_closed_open_half_open_closed(runner):
    faulty = FaultyRunner(runner)
    cfg = ServerConfig(port=0, breaker=BreakerConfig(failure_threshold=2, recovery_seconds=1, half_open_probes=1,
                                                     stall_seconds=0.5))
    clock = Clock()                                        # the breaker's windows pass when the test says
    srv = InProcessServer(faulty, cfg, clock=clock)
    try:
        with LawchatClient(srv.target, timeout=30, retry=NO_RETRY) as c, ThreadPoolExecutor(2) as pool:
            s, _ = ask(c)
            assert (s.finish_reason, s.degraded, breaker_state(c)) == ("max_tokens", False, "BREAKER_STATE_CLOSED")

            faulty.set_mode("raise")                       # closed -> open after 2 consecutive engine errors
            for _ in range(2):
                with pytest.raises(LawchatError) as e:
                    ask(c)
                assert e.value.code == grpc.StatusCode.INTERNAL
            assert breaker_state(c) == "BREAKER_STATE_OPEN"
            calls = faulty.calls
            for _ in range(5):                             # open: the canned answer, no INTERNAL, no engine call
                s, text = ask(c)
                assert (s.finish_reason, s.degraded, text) == ("degraded", True, DEFAULT_MESSAGE)
            assert faulty.calls == calls
            assert c.chat(QUESTION).degraded
            assert srv.app.metrics.degraded.labels("breaker_open")._value.get() == 6
            assert srv.app.metrics.breaker_state.collect()[0].samples[0].value == 2   # read at scrape time

            clock.t += 1.1                                 # half-open: one probe; it fails -> open again
            assert breaker_state(c) == "BREAKER_STATE_HALF_OPEN"
            with pytest.raises(LawchatError) as e:
                ask(c)
            assert e.value.code == grpc.StatusCode.INTERNAL
            assert breaker_state(c) == "BREAKER_STATE_OPEN"

            clock.t += 1.1                                 # half-open with a hanging engine: the probe stalls ...
            faulty.set_mode("hang")
            probe = pool.submit(ask, c)
            assert wait_until(lambda: srv.app.breaker._probes == 1)
            s, text = ask(c)                               # ... and meanwhile others get canned (bounded probes)
            assert s.degraded and text == DEFAULT_MESSAGE
            with pytest.raises(LawchatError) as e:
                probe.result(10)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE and "no step" in e.value.details
            assert breaker_state(c) == "BREAKER_STATE_OPEN"
            assert srv.app.metrics.breaker_failures.labels("stalled")._value.get() == 1

            faulty.set_mode("ok")                          # the engine recovers: the next probe closes it
            clock.t += 1.1
            s, text = ask(c)
            assert (s.finish_reason, s.degraded) == ("max_tokens", False) and text != DEFAULT_MESSAGE
            assert breaker_state(c) == "BREAKER_STATE_CLOSED"
            assert [ask(c)[0].degraded for _ in range(3)] == [False] * 3
    finally:
        faulty.set_mode("ok")
        srv.stop()


def test_client_cancel_and_deadline_are_not_engine_successes(runner):
    """The circuitbreaker package would reset its failure count on CancelledError; here it must not. A request
    that left before its first token is neither a failure nor a success (the first token is the success)."""
    faulty = FaultyRunner(runner, delay=0.02)
    cfg = ServerConfig(port=0, breaker=BreakerConfig(failure_threshold=2, recovery_seconds=60))
    srv = InProcessServer(faulty, cfg)
    try:
        with LawchatClient(srv.target, timeout=30, retry=NO_RETRY) as c:
            faulty.fail_steps = 1
            with pytest.raises(LawchatError):
                ask(c)
            assert c.status()["breaker"]["consecutive_failures"] == 1
            faulty.set_mode("hang")                                # nobody gets a first token now
            stub = chat_pb2_grpc.ChatServiceStub(c._channel)
            leaving = stub.Chat.future(chat_pb2.ChatRequest(messages=[chat_pb2.Message(role="user", content=QUESTION)]))
            assert wait_until(lambda: faulty.calls >= 2)
            leaving.cancel()                                       # a client that leaves
            with pytest.raises(LawchatError) as e:
                ask(c, n=300, timeout=0.5)                         # a client whose deadline passes
            assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            faulty.set_mode("ok")
            assert wait_until(lambda: engine_of(srv).running == 0)
            assert c.status()["breaker"]["consecutive_failures"] == 1   # neither counted nor reset
            faulty.fail_steps = 1
            with pytest.raises(LawchatError):
                ask(c)
            assert breaker_state(c) == "BREAKER_STATE_OPEN"        # so the next real failure opens it
            assert ask(c)[0].degraded
    finally:
        faulty.set_mode("ok")
        srv.stop()


def test_degraded_switch_on_and_off(runner):
    faulty = FaultyRunner(runner)
    srv = InProcessServer(faulty)
    try:
        with LawchatClient(srv.target, timeout=30, retry=NO_RETRY) as c:
            normal = ask(c, n=6)[1]
            sw = c.set_degraded(True, "GPU 维护")
            assert sw == {"enabled": True, "reason": "GPU 维护"}
            calls = faulty.calls
            s, text = ask(c, n=6)
            assert (s.degraded, s.finish_reason, text) == (True, "degraded", DEFAULT_MESSAGE)
            r = c.chat(QUESTION)
            assert r.degraded and r.finish_reason == "degraded" and "12348" in r.text
            assert faulty.calls == calls                          # the model was not asked
            st = c.status()
            assert st["degraded"] == {"enabled": True, "reason": "GPU 维护"}
            assert st["breaker"]["state"] == "BREAKER_STATE_CLOSED"   # the switch is not the breaker
            assert srv.app.metrics.degraded.labels("switch")._value.get() == 2
            with pytest.raises(LawchatError) as e:                # bad requests are still bad
                c.chat([])
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert c.set_degraded(False) == {"enabled": False, "reason": ""}
            s, text = ask(c, n=6)
            assert not s.degraded and text == normal
    finally:
        srv.stop()


# -- ReloadModel ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def second_model(tiny_model, tmp_path_factory):
    from test_engine_batching import TINY
    from lawchat_trainer.random_model import make_random_model
    return make_random_model(tmp_path_factory.mktemp("second-model"), tiny_model, TINY, "glm", dtype=torch.float32,
                             seed=3)


def loader(path):
    engine = Engine(load_runner(path, device="cpu"))
    engine.start()
    return engine


def test_reload_model_keeps_the_running_stream_and_switches_new_requests(runner, tiny_model, second_model, tmp_path):
    old_answer, new_answer = greedy_text(runner, 60), greedy_text(load_runner(second_model, device="cpu"), 8)
    assert old_answer[:8] != new_answer
    faulty = FaultyRunner(runner, delay=0.03)                 # 60 tokens take ~2 s
    srv = InProcessServer(faulty, loader=loader)
    old_engine = engine_of(srv)
    try:
        with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c, ThreadPoolExecutor(1) as pool:
            running = pool.submit(lambda: c.chat(QUESTION, max_new_tokens=60, ignore_eos=True))
            assert wait_until(lambda: old_engine.running == 1)
            r = c.reload_model(str(second_model))
            assert r["model_path"] == str(second_model) and r["previous_model_path"] == "tiny"
            assert not running.done()                             # reloaded while the stream still runs
            assert c.chat(QUESTION, max_new_tokens=8, ignore_eos=True).text == new_answer
            done = running.result(30)
            assert (done.finish_reason, done.completion_tokens, done.text) == ("max_tokens", 60, old_answer)
            assert wait_until(lambda: not old_engine.alive)       # the old engine stops once its stream ended
            assert c.status()["model_path"] == str(second_model)

            broken = tmp_path / "broken"
            broken.mkdir()
            (broken / "config.json").write_text('{"model_type": "glm", "hidden_size": "garbage"}')
            for path, code in ((str(tmp_path / "missing"), grpc.StatusCode.INVALID_ARGUMENT),
                               ("", grpc.StatusCode.INVALID_ARGUMENT),
                               (str(broken), grpc.StatusCode.FAILED_PRECONDITION)):
                with pytest.raises(LawchatError) as e:
                    c.reload_model(path)
                assert e.value.code == code, e.value
            assert c.status()["model_path"] == str(second_model)   # the old model keeps serving
            assert c.chat(QUESTION, max_new_tokens=8, ignore_eos=True).text == new_answer
    finally:
        srv.stop()


# -- Drain --------------------------------------------------------------------------------------------------
def test_drain_refuses_new_requests_while_in_flight_finish(runner):
    faulty = FaultyRunner(runner, delay=0.02)
    srv = InProcessServer(faulty)
    try:
        with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c, ThreadPoolExecutor(2) as pool, \
                grpc.insecure_channel(srv.target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            in_flight = pool.submit(lambda: c.chat(QUESTION, max_new_tokens=120, ignore_eos=True))   # ~2.5 s
            assert wait_until(lambda: engine_of(srv).running == 1)
            short = c.drain(timeout_seconds=0.2)                  # a drain that times out says so
            assert short == {"drained": False, "in_flight": 1}
            drain = pool.submit(lambda: c.drain(timeout_seconds=30))
            with pytest.raises(LawchatError) as e:               # refused while the stream still runs
                c.chat(QUESTION, max_new_tokens=2)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE and "draining" in e.value.details
            assert health.Check(health_pb2.HealthCheckRequest(service="lawchat.v1.ChatService")).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            assert not in_flight.done() and not drain.done()
            result = in_flight.result(30)
            assert (result.finish_reason, result.completion_tokens) == ("max_tokens", 120)
            assert drain.result(30) == {"drained": True, "in_flight": 0}
            assert c.status()["draining"] is True
    finally:
        srv.stop()


def test_port_is_bound_before_the_model_loads_and_chat_waits_for_it(tiny_model):
    """While the first model loads: the port answers, ChatService health is NOT_SERVING (liveness SERVING: a
    loading server must not be restarted), chat is UNAVAILABLE."""
    from lawchat_server.app import build_app, start_app, stop_app
    from lawchat_server.engine_slot import EngineSlot

    async def go():
        slot = EngineSlot()
        app = build_app(ServerConfig(port=0), slot)
        await start_app(app)
        target = f"127.0.0.1:{app.port}"
        try:
            async with grpc.aio.insecure_channel(target) as ch:
                health = health_pb2_grpc.HealthStub(ch)
                h = await health.Check(health_pb2.HealthCheckRequest(service="lawchat.v1.ChatService"))
                assert h.status == health_pb2.HealthCheckResponse.NOT_SERVING
                for name in ("", "liveness"):
                    h = await health.Check(health_pb2.HealthCheckRequest(service=name))
                    assert h.status == health_pb2.HealthCheckResponse.SERVING
                call = chat_pb2_grpc.ChatServiceStub(ch).Chat(
                    chat_pb2.ChatRequest(messages=[chat_pb2.Message(role="user", content=QUESTION)]), timeout=10)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in e.value.details()
                slot.set(await asyncio.to_thread(loader, tiny_model), tiny_model)
                deadline = time.monotonic() + 5
                while (await health.Check(health_pb2.HealthCheckRequest(service="lawchat.v1.ChatService"))).status \
                        != health_pb2.HealthCheckResponse.SERVING:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
                r = await chat_pb2_grpc.ChatServiceStub(ch).Chat(chat_pb2.ChatRequest(
                    messages=[chat_pb2.Message(role="user", content=QUESTION)],
                    stopping=chat_pb2.StoppingCriteria(max_new_tokens=2, ignore_eos=True)), timeout=30)
                assert r.usage.completion_tokens == 2
        finally:
            await stop_app(app, 0)
    asyncio.run(asyncio.wait_for(go(), 120))


def test_engine_death_turns_health_not_serving(runner):
    srv = InProcessServer(runner)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            req = health_pb2.HealthCheckRequest(service="lawchat.v1.ChatService")
            assert health.Check(req).status == health_pb2.HealthCheckResponse.SERVING
            threading.Thread(target=engine_of(srv).stop).start()      # the engine goes away under the server
            assert wait_until(lambda: health.Check(req).status == health_pb2.HealthCheckResponse.NOT_SERVING, 5)
    finally:
        srv.stop()


def test_request_size_limits_are_invalid_argument(runner):
    from lawchat_server.params import GenerationDefaults
    cfg = ServerConfig(port=0, generation=GenerationDefaults(max_request_bytes=2000, max_messages=3,
                                                             max_message_chars=500))
    srv = InProcessServer(runner, cfg)
    try:
        with LawchatClient(srv.target, timeout=30, retry=NO_RETRY) as c:
            cases = [([("user", "法" * 400)] * 2, "bytes; this server takes at most 2000"),
                     ([("user", "问")] * 4, "4 messages; this server takes at most 3"),
                     ([("user", "a" * 501)], "messages[0].content has 501 characters")]
            for messages, needle in cases:
                with pytest.raises(LawchatError) as e:
                    c.chat(list(messages), max_new_tokens=2)
                assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details
            assert c.chat([("user", "问")] * 3, max_new_tokens=2, ignore_eos=True).completion_tokens == 2
    finally:
        srv.stop()
