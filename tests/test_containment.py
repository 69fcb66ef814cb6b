"""Failure containment: a bad request fails only itself, the breaker counts engine events (not requests), health
tells a balancer what a replica can do, and the prefix cache cannot be steered by hash collisions.

Real engine and real gRPC servers on loopback around the tiny model; the faults are injected (PoisonRunner,
FaultyRunner) and the breaker's clock is stepped by hand (no sleeping for recovery windows)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lawchat_client import LawchatClient, LawchatError, NO_RETRY

from faults import Clock, FaultyRunner, InProcessServer, PoisonRunner, engine_of, wait_until
from lawchat_server.breaker import Breaker, BreakerConfig, EngineFailure
from lawchat_server.config import ServerConfig
from lawchat_server.engine import block_manager
from lawchat_server.engine.block_manager import BlockManager
from lawchat_server.engine.config import EngineConfig
from lawchat_server.engine.engine import (Engine, GenerationRequest, InvalidGeneration, StepFailed, check_request,
                                          fold_seed, generate_batch)
from lawchat_server.engine.model_runner import load_runner
from lawchat_server.engine.sampler import SamplingParams
from lawchat_server.engine.sequence import Sequence

QUESTIONS = ["劳动合同法第三十九条是怎么规定的？", "试用期最长可以约定多久？", "房东不退押金怎么办？"]
POISONED = "请问 ZQXJ 违约金怎么算？"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def runner(tiny_model):
    return load_runner(tiny_model, device="cpu")


def ids_of(runner, text: str) -> list[int]:
    return runner.encode_chat([{"role": "user", "content": text}])


@pytest.fixture(scope="module")
def poison(runner) -> int:
    """A token id in the poisoned question and in none of the ordinary ones."""
    ordinary = {t for q in QUESTIONS for t in ids_of(runner, q)}
    (tok, *_) = [t for t in ids_of(runner, POISONED) if t not in ordinary]
    return tok


@pytest.fixture(scope="module")
def clean(runner) -> list[str]:
    """The ordinary questions' greedy answers from an engine with no fault."""
    engine = Engine(runner, EngineConfig())
    engine.start()
    try:
        return [c.delta for c in generate_batch(engine, [ids_of(runner, q) for q in QUESTIONS], 24, ignore_eos=True)]
    finally:
        engine.stop()


# -- the engine owns its invariants ---------------------------------------------------------------------
def request(ids, max_new=4, **sampling) -> GenerationRequest:
    return GenerationRequest(list(ids), SamplingParams(**sampling), max_new)


@pytest.mark.parametrize("bad, field", [
    (dict(seed=2**64), "seed"), (dict(seed=-1), "seed"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(top_k="vocab+1"), "top_k"), (dict(max_new="past max_len"), "max_new_tokens"),
    (dict(max_new=0), "max_new_tokens"), (dict(ids="out of vocab"), "prompt_ids"), (dict(ids=[]), "prompt_ids"),
    (dict(ids="max_len"), "prompt_ids"), (dict(stops=[""]), "stop_sequences"), (dict(stops=[None]), "stop_sequences"),
])
def test_submit_refuses_what_a_step_could_choke_on(runner, bad, field):
    """Engine.submit checks every field itself (eval and scripts call it without the gRPC layer's checks)."""
    engine = Engine(runner, EngineConfig())
    ids = ids_of(runner, QUESTIONS[0])
    bad = dict(bad)
    if bad.get("top_k") == "vocab+1":
        bad["top_k"] = runner.vocab_size + 1
    if bad.get("max_new") == "past max_len":
        bad["max_new"] = engine.max_len - len(ids) + 1
    if bad.get("ids") == "out of vocab":
        bad["ids"] = ids[:-1] + [runner.vocab_size]
    elif bad.get("ids") == "max_len":
        bad["ids"] = ids * (engine.max_len // len(ids) + 1)
    req = request(bad.pop("ids", ids), bad.pop("max_new", 4), **{k: v for k, v in bad.items() if k != "stops"})
    req.stop_sequences = bad.get("stops", [])
    with pytest.raises(InvalidGeneration) as e:
        engine.submit(req, sink=None)
    assert e.value.field == field and field in str(e.value)
    assert engine.waiting == 0                                  # nothing was queued


def test_the_full_uint64_seed_range_is_accepted_and_folded(runner):
    """A proto uint64 seed at 2**64-1 used to overflow the int64 tensor inside the step (every stream in it ended
    INTERNAL). Now it is folded to the int64 with the same bits: it samples, reproducibly."""
    assert fold_seed(2**64 - 1) == -1 and fold_seed(2**63) == -2**63 and fold_seed(2**63 - 1) == 2**63 - 1
    engine = Engine(runner, EngineConfig())
    engine.start()
    try:
        ids = ids_of(runner, QUESTIONS[0])
        outs = [generate_batch(engine, [ids], 12, SamplingParams(temperature=1.0, top_k=runner.vocab_size,
                                                                  seed=seed), ignore_eos=True)[0]
                for seed in (2**64 - 1, 2**64 - 1, 2**63, 2**63 - 1)]
        assert all(o.completion_tokens == 12 for o in outs)
        assert outs[0].token_ids == outs[1].token_ids             # seeded: the same draw twice
    finally:
        engine.stop()
    check_request(request(ids, 1, seed=2**64 - 1, top_k=runner.vocab_size), engine.max_len, runner.vocab_size)


# -- a step error blames only its cause -----------------------------------------------------------------
class Collect:
    """A sink that keeps every chunk or error per tag; `done` when each tag has its last item."""

    def __init__(self, tags):
        self.items = {t: [] for t in tags}
        self.lock = threading.Lock()

    def deliver(self, items):
        with self.lock:
            for tag, item in items:
                self.items[tag].append(item)

    def finished(self, tag) -> bool:
        got = self.items[tag]
        return bool(got) and (isinstance(got[-1], BaseException) or got[-1].finish_reason is not None)

    def text(self, tag) -> str:
        return "".join(c.delta for c in self.items[tag])


@pytest.mark.parametrize("overlap", [True, False])
def test_a_failing_sequence_fails_alone_and_its_batch_goes_on(runner, poison, clean, overlap):
    """A step that raises because of one sequence: that one gets StepFailed(isolated), the others continue with
    exactly the tokens a fault-free engine gives — whether the poisoned prompt came in the same prefill step or
    joined a step of decoding sequences later."""
    faulty = PoisonRunner(runner, poison)
    engine = Engine(faulty, EngineConfig(overlap=overlap))
    tags = ["q0", "q1", "q2", "p-first", "p-late"]
    sink = Collect(tags)
    for i, q in enumerate(QUESTIONS):                       # queued before the engine starts: one prefill step
        engine.submit(GenerationRequest(ids_of(runner, q), SamplingParams(), 24, ignore_eos=True), sink, f"q{i}")
    engine.submit(GenerationRequest(ids_of(runner, POISONED), SamplingParams(), 24), sink, "p-first")
    engine.start()
    try:
        assert wait_until(lambda: all(len(sink.items[f"q{i}"]) >= 3 for i in range(3)), 30)
        engine.submit(GenerationRequest(ids_of(runner, POISONED), SamplingParams(), 24), sink, "p-late")
        assert wait_until(lambda: all(sink.finished(t) for t in tags), 60)
        for tag in ("p-first", "p-late"):
            (err,) = sink.items[tag]
            assert isinstance(err, StepFailed) and err.isolated, err
        assert [sink.text(f"q{i}") for i in range(3)] == clean     # exact: the re-run changed nothing
        assert faulty.failed >= 4             # each poisoned one: its mixed step, then itself alone
    finally:
        engine.stop()


def test_over_grpc_a_poisoned_request_is_internal_and_its_neighbours_are_fine(runner, poison, clean):
    cfg = ServerConfig(port=0, breaker=BreakerConfig(failure_threshold=1))
    srv = InProcessServer(PoisonRunner(runner, poison, delay=0.01), cfg)
    try:
        with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c, ThreadPoolExecutor(8) as pool:
            def ordinary(i):
                return "".join(c.chat_stream(QUESTIONS[i], max_new_tokens=24, ignore_eos=True))

            def poisoned():
                with pytest.raises(LawchatError) as e:
                    c.chat(POISONED, max_new_tokens=8)
                return e.value
            futs = [pool.submit(ordinary, i % 3) for i in range(6)] + [pool.submit(poisoned) for _ in range(2)]
            results = [f.result(120) for f in futs]
            assert results[:6] == [clean[i % 3] for i in range(6)]
            for err in results[6:]:
                assert err.code == grpc.StatusCode.INTERNAL and "this request alone" in err.details
            st = c.status()["breaker"]      # threshold 1: any count would have opened it
            assert st["state"] == "BREAKER_STATE_CLOSED" and st["consecutive_failures"] == 0
            assert srv.app.metrics.breaker_failures.labels("error")._value.get() == 0
    finally:
        srv.stop()


def test_one_failed_step_is_one_breaker_failure_however_many_streams_it_ends(runner):
    """The engine breaks under 4 decoding streams: all 4 end INTERNAL, the breaker counts 1 (not 4)."""
    faulty = FaultyRunner(runner, delay=0.02)
    cfg = ServerConfig(port=0, breaker=BreakerConfig(failure_threshold=3))
    srv = InProcessServer(faulty, cfg)
    try:
        with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c, ThreadPoolExecutor(4) as pool:
            def stream(i):
                with pytest.raises(LawchatError) as e:
                    for _ in c.chat_stream(QUESTIONS[i % 3], max_new_tokens=400, ignore_eos=True):
                        pass
                return e.value.code
            futs = [pool.submit(stream, i) for i in range(4)]
            assert wait_until(lambda: engine_of(srv).running == 4, 30)
            faulty.set_mode("raise")
            assert [f.result(60) for f in futs] == [grpc.StatusCode.INTERNAL] * 4
            st = c.status()["breaker"]
            assert st["consecutive_failures"] == 1 and st["state"] == "BREAKER_STATE_CLOSED"
    finally:
        faulty.set_mode("ok")
        srv.stop()


# -- the breaker, on a clock the tests step ---------------------------------------------------------------
def test_breaker_counts_each_event_once_and_waits_on_its_clock():
    clock = Clock()
    b = Breaker(BreakerConfig(failure_threshold=2, recovery_seconds=30), clock)
    t1, t2, t3 = b.admit(), b.admit(), b.admit()
    assert b.failure(t1, EngineFailure("error", ("step", 1, 7)))
    assert not b.failure(t2, EngineFailure("error", ("step", 1, 7)))      # the same step: not again
    assert (b.state, b.failures) == ("closed", 1)
    assert b.failure(t3, EngineFailure("stalled", ("stalled", 1, 40)))
    assert b.state == "open" and b.admit() == "breaker_open"
    assert not b.failure(None, EngineFailure("error", ("step", 1, 8)))    # while open: nothing to add
    clock.t += 29.9
    assert b.state == "open" and b.open_remaining == pytest.approx(0.1)
    clock.t += 0.2
    assert b.state == "half_open"
    probe = b.admit()
    assert probe.probe and b.admit() == "breaker_open"                    # one probe at a time
    b.success(probe)
    assert (b.state, b.failures) == ("closed", 0)
    old = b.admit()                                   # a first token that raced a failure resets nothing ...
    assert b.failure(None, EngineFailure("error", ("step", 1, 9)))
    b.success(old)
    assert b.failures == 1
    b.success(b.admit())                              # ... one admitted after it does
    assert b.failures == 0


def test_a_half_open_probe_is_judged_on_its_first_token(runner):
    """Recovery is seen as soon as the probe's first token arrives, not when its (long) stream ends."""
    clock = Clock()
    faulty = FaultyRunner(runner, delay=0.02)
    cfg = ServerConfig(port=0, breaker=BreakerConfig(failure_threshold=1, recovery_seconds=30))
    srv = InProcessServer(faulty, cfg, clock=clock)
    try:
        with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c:
            faulty.fail_steps = 1
            with pytest.raises(LawchatError):
                c.chat(QUESTIONS[0], max_new_tokens=3)
            assert c.status()["breaker"]["state"] == "BREAKER_STATE_OPEN"
            clock.t += 31
            stream = c.chat_stream(QUESTIONS[0], max_new_tokens=300, ignore_eos=True)   # ~6 s of steps
            it = iter(stream)
            next(it)
            assert c.status()["breaker"]["state"] == "BREAKER_STATE_CLOSED"
            assert engine_of(srv).running == 1                  # the probe is still streaming
            stream.cancel()
    finally:
        srv.stop()


# -- health by name ---------------------------------------------------------------------------------------
def health_of(target: str, name: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status


def test_health_chat_follows_the_breaker_and_drain_liveness_does_not(runner):
    clock = Clock()
    faulty = FaultyRunner(runner)
    cfg = ServerConfig(port=0, breaker=BreakerConfig(failure_threshold=1, recovery_seconds=30))
    srv = InProcessServer(faulty, cfg, clock=clock)
    chat = "lawchat.v1.ChatService"
    try:
        with LawchatClient(srv.target, timeout=30, retry=NO_RETRY) as c:
            assert [health_of(srv.target, n) for n in (chat, "liveness", "")] == [SERVING] * 3
            faulty.fail_steps = 1
            with pytest.raises(LawchatError):
                c.chat(QUESTIONS[0], max_new_tokens=3)
            assert wait_until(lambda: health_of(srv.target, chat) == NOT_SERVING, 5)   # open: out of the pool
            assert health_of(srv.target, "liveness") == SERVING and health_of(srv.target, "") == SERVING
            assert c.chat(QUESTIONS[0]).degraded                  # a direct client still gets the canned answer
            clock.t += 31                                         # half-open: back in, so that probes can come
            assert wait_until(lambda: health_of(srv.target, chat) == SERVING, 5)
            assert not c.chat(QUESTIONS[0], max_new_tokens=2).degraded
            c.drain(timeout_seconds=0.1)
            assert wait_until(lambda: health_of(srv.target, chat) == NOT_SERVING, 5)
            time.sleep(0.6)                                       # a poll later: a drain never fails liveness
            assert health_of(srv.target, "liveness") == SERVING and health_of(srv.target, "") == SERVING
    finally:
        srv.stop()


def test_behind_a_retrying_proxy_a_degraded_replica_says_unavailable(runner):
    """Envoy marks its attempts (x-envoy-attempt-count): before its last one, an open breaker answers UNAVAILABLE
    (Envoy retries another replica) instead of canned text; the last attempt, and direct clients, get the
    canned answer."""
    faulty = FaultyRunner(runner)
    srv = InProcessServer(faulty, ServerConfig(port=0, breaker=BreakerConfig(failure_threshold=1)))
    try:
        with LawchatClient(srv.target, timeout=30, retry=NO_RETRY) as c:
            faulty.fail_steps = 1
            with pytest.raises(LawchatError):
                c.chat(QUESTIONS[0], max_new_tokens=3)
            from lawchat.v1 import chat_pb2, chat_pb2_grpc
            stub = chat_pb2_grpc.ChatServiceStub(c._channel)
            req = chat_pb2.ChatRequest(messages=[chat_pb2.Message(role="user", content=QUESTIONS[0])])
            for attempt in ("1", "2"):
                with pytest.raises(grpc.RpcError) as e:
                    stub.Chat(req, metadata=(("x-envoy-attempt-count", attempt),), timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "breaker_open" in e.value.details()
            assert stub.Chat(req, metadata=(("x-envoy-attempt-count", "3"),), timeout=10).degraded
            assert stub.Chat(req, timeout=10).degraded
    finally:
        srv.stop()


# -- prefix-cache keys --------------------------------------------------------------------------------------
def test_prefix_cache_keys_do_not_trust_pythons_hash(monkeypatch):
    """CVE-2025-25183's shape: a block whose ids equal another prefix's *second* block, with a parent key that
    collides. Were keys Python's hash(), B would reuse A's second block (K/V computed after A's first block, at
    other positions). Keys are keyed BLAKE2b over the parent's digest: nothing to collide."""
    bs = 16
    a0, a1 = list(range(100, 116)), list(range(200, 216))

    def evil_hash(x):             # (None, a1) — B's first block — collides with (A's first key, a1) under hash()
        if isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple) and x[1] == tuple(a1):
            return 12345
        return hash(x)
    monkeypatch.setattr(block_manager, "hash", evil_hash, raising=False)
    bm = BlockManager(num_blocks=16, block_size=bs)
    seq_a = Sequence(a0 + a1 + [1], SamplingParams(), 4, seed=0)
    bm.allocate(seq_a, len(seq_a))
    seq_a.num_computed = len(seq_a)
    bm.register_full_blocks(seq_a)
    seq_b = Sequence(a1 + a0 + [1], SamplingParams(), 4, seed=0)
    assert bm.match_prefix(seq_b) == 0 and not seq_b.block_table     # no block of A is handed to B
    seq_c = Sequence(a0 + a1 + [2], SamplingParams(), 4, seed=0)
    assert bm.match_prefix(seq_c) == 2 * bs                           # a true shared prefix still hits
    assert seq_c.block_table == seq_a.block_table[:2]


# -- who the limiter charges --------------------------------------------------------------------------------
def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_bucket(runner):
    """With the proxy's address in limits.trusted_proxies, x-forwarded-for names the client (one bucket each);
    from anyone else the header is ignored (no escaping your bucket by writing it)."""
    from lawchat.v1 import chat_pb2, chat_pb2_grpc

    from lawchat_server.limiter import LimitsConfig, Rate

    def codes(srv, forwarded: list[str]) -> list[str]:
        with grpc.insecure_channel(srv.target) as ch:
            stub = chat_pb2_grpc.ChatServiceStub(ch)
            req = chat_pb2.ChatRequest(messages=[chat_pb2.Message(role="user", content=QUESTIONS[0])],
                                       stopping=chat_pb2.StoppingCriteria(max_new_tokens=1))
            out = []
            for xff in forwarded:
                try:
                    stub.Chat(req, metadata=(("x-forwarded-for", xff),), timeout=30)
                    out.append("OK")
                except grpc.RpcError as e:
                    out.append(e.code().name)
            return out
    one_each = dict(client_requests=Rate(rate=0.01, burst=1))
    sequence = ["203.0.113.9", "203.0.113.9", "198.51.100.2", "6.6.6.6, 198.51.100.3"]
    trusting = InProcessServer(runner, ServerConfig(port=0, limits=LimitsConfig(**one_each,
                                                                                trusted_proxies=["127.0.0.1"])))
    try:
        assert codes(trusting, sequence) == ["OK", "RESOURCE_EXHAUSTED", "OK", "OK"]
    finally:
        trusting.stop()
    plain = InProcessServer(runner, ServerConfig(port=0, limits=LimitsConfig(**one_each)))
    try:
        assert codes(plain, sequence) == ["OK"] + ["RESOURCE_EXHAUSTED"] * 3
    finally:
        plain.stop()
