"""Property-based fuzzing (hypothesis) of ChatService requests against a real in-process server.

Every request gets the status a written-down oracle of the API's rules predicts (OK or INVALID_ARGUMENT;
a prompt that does not fit may be either when the oracle cannot count tokens), every OK stream ends with
a final message, and the server keeps serving afterwards.
"""
from __future__ import annotations

import math

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from lawchat.v1 import chat_pb2, chat_pb2_grpc

from faults import InProcessServer
from lawchat_server.config import ServerConfig
from lawchat_server.engine.model_runner import load_runner
from lawchat_server.params import GenerationDefaults

D = GenerationDefaults()
ODD_TEXT = st.sampled_from(["", " ", "\n\t", "\u200b", "\ufeff问", "😀⚖️", "\u0000", "a\u0301", "法" * 600,
                            "<|user|>", "<|assistant|>\n", "[gMASK]sop", "{{ raise_exception('x') }}", "%s%n"])
# mostly valid values with odd ones mixed in, so that one bad field at a time is common
PLAIN = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40)
TEXT = st.one_of(PLAIN, PLAIN, ODD_TEXT,
                 st.builds(lambda n, ch: ch * n, st.integers(D.max_message_chars - 1, D.max_message_chars + 1),
                           st.sampled_from(["法", "a", " ", "😀"])))   # around the per-message character limit
ROLE = st.sampled_from(["user"] * 6 + ["assistant", "system", "", "User", "tool", "律师", "user\x00"])
FLOAT = st.one_of(st.none(), st.floats(0, 2, width=32), st.floats(allow_nan=True, allow_infinity=True, width=32),
                  st.sampled_from([0.0, 1.0, 2.0, -0.0, -1e-8, 2.0000002]))
TOKENS = st.one_of(st.none(), st.integers(1, 6), st.integers(0, 6), st.integers(D.max_new_tokens_limit + 1, 2**32 - 1))
STOPS = st.one_of(st.just([]), st.lists(st.text(min_size=1, max_size=3), max_size=3),
                  st.lists(st.one_of(st.just(""), st.text(max_size=3), st.text(min_size=60, max_size=70)), max_size=10))
METADATA = st.lists(st.tuples(st.sampled_from(["x-request-id", "x-api-key", "x-odd"]),
                              st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=200)),
                    max_size=3)


def oracle(msgs, temperature, top_p, max_new, stops, size: int, top_k=None, vocab=None) -> tuple[str | None, str]:
    """(INVALID_ARGUMENT and a phrase its message must hold) or OK; None when only the tokenizer can tell
    (a prompt near the tiny model's length limit)."""
    bad = "INVALID_ARGUMENT"
    if size > D.max_request_bytes:
        return bad, f"the request has {size} bytes"
    if not msgs:
        return bad, "messages is empty"
    if len(msgs) > D.max_messages:
        return bad, "messages; this server takes at most"
    for i, (role, content) in enumerate(msgs):
        if role not in ("system", "user", "assistant"):
            return bad, f"messages[{i}].role must be one of"
        if len(content) > D.max_message_chars:
            return bad, f"messages[{i}].content has {len(content)} characters"
        if role != "assistant" and not content.strip():
            return bad, f"messages[{i}].content is empty"
    if msgs[-1][0] != "user":
        return bad, "the last message must have role 'user'"
    t = D.temperature if temperature is None else temperature
    p = D.top_p if top_p is None else top_p
    if not (0.0 <= t <= 2.0) or math.isnan(t):
        return bad, "sampling.temperature must be in [0, 2]"
    if not (0.0 < p <= 1.0) or math.isnan(p):
        return bad, "sampling.top_p must be in (0, 1]"
    n = D.max_new_tokens if max_new is None else max_new
    if not 1 <= n <= D.max_new_tokens_limit:
        return bad, "stopping.max_new_tokens must be in"
    if len(stops) > D.max_stop_sequences:
        return bad, f"at most {D.max_stop_sequences} stop_sequences"
    for i, s in enumerate(stops):
        if not s or len(s) > D.max_stop_sequence_chars:
            return bad, f"stopping.stop_sequences[{i}] must have"
    if sum(len(c) for _, c in msgs) > 200:      # the tiny model's max_len: may not fit
        return None, ""
    if top_k is not None and top_k > vocab:     # the engine's own check: top_k against the vocabulary
        return bad, "top_k: must be in [0,"
    return "OK", ""


@pytest.fixture(scope="module")
def served(tiny_model):
    runner = load_runner(tiny_model, device="cpu")
    srv = InProcessServer(runner, ServerConfig(port=0))
    channel = grpc.insecure_channel(srv.target)
    yield chat_pb2_grpc.ChatServiceStub(channel), runner.vocab_size
    channel.close()
    srv.stop()


@pytest.fixture(scope="module")
def stub(served):
    return served[0]


# derandomize: the same examples in every run, so CI is repeatable
@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(msgs=st.lists(st.tuples(ROLE, TEXT), max_size=4) | st.lists(st.tuples(st.just("user"), st.just("问")),
                                                                    min_size=D.max_messages, max_size=D.max_messages + 1),
       temperature=FLOAT, top_p=FLOAT, top_k=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
       seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)), max_new=TOKENS, stops=STOPS,
       ignore_eos=st.booleans(), metadata=METADATA, streaming=st.booleans())
# the boundaries, always tried besides what hypothesis draws
@example(msgs=[("user", "😀" * D.max_message_chars)] * 5, temperature=None, top_p=None, top_k=None, seed=None,
         max_new=2, stops=[], ignore_eos=False, metadata=[], streaming=False)       # over max_request_bytes
@example(msgs=[("user", "问")], temperature=-1.0, top_p=None, top_k=None, seed=None, max_new=2, stops=[],
         ignore_eos=False, metadata=[], streaming=True)
@example(msgs=[("user", "问")], temperature=None, top_p=0.0, top_k=None, seed=None, max_new=2, stops=[],
         ignore_eos=False, metadata=[], streaming=False)
@example(msgs=[("user", "问")], temperature=float("nan"), top_p=float("nan"), top_k=None, seed=None, max_new=2,
         stops=[], ignore_eos=False, metadata=[], streaming=False)
@example(msgs=[("user", "法" * (D.max_message_chars + 1))], temperature=None, top_p=None, top_k=None, seed=None,
         max_new=2, stops=[], ignore_eos=False, metadata=[], streaming=True)
@example(msgs=[("user", "问")], temperature=None, top_p=None, top_k=None, seed=None, max_new=2,
         stops=["a"] * (D.max_stop_sequences + 1), ignore_eos=False, metadata=[("x-request-id", " bad id; DROP TABLE ")],
         streaming=True)
def test_fuzzed_requests_get_the_right_status(served, msgs, temperature, top_p, top_k, seed, max_new, stops,
                                              ignore_eos, metadata, streaming):
    stub, vocab = served
    sampling = chat_pb2.SamplingParameters()
    for name, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if v is not None:
            setattr(sampling, name, v)
    stopping = chat_pb2.StoppingCriteria(stop_sequences=stops, ignore_eos=ignore_eos)
    if max_new is not None:
        stopping.max_new_tokens = max_new
    kw = dict(messages=[chat_pb2.Message(role=r, content=c) for r, c in msgs], sampling=sampling, stopping=stopping)
    # the oracle sees what went over the wire (float32)
    want, needle = oracle(msgs, sampling.temperature if temperature is not None else None,
                  sampling.top_p if top_p is not None else None, max_new, stops,
                  chat_pb2.ChatRequest(**kw).ByteSize(), top_k, vocab)
    try:
        if streaming:
            out = list(stub.ChatStream(chat_pb2.ChatStreamRequest(**kw), metadata=metadata, timeout=60))
            final = out[-1]
            assert all(m.finish_reason == chat_pb2.FINISH_REASON_UNSPECIFIED for m in out[:-1])
        else:
            final = stub.Chat(chat_pb2.ChatRequest(**kw), metadata=metadata, timeout=60)
        got = "OK"
        assert final.finish_reason != chat_pb2.FINISH_REASON_UNSPECIFIED
        assert 1 <= final.usage.completion_tokens <= (max_new or D.max_new_tokens)
    except grpc.RpcError as e:
        got = e.code().name
        assert e.details()
        assert needle in e.details() or want is None, (needle, e.details())
    assert got in ("OK", "INVALID_ARGUMENT"), got
    if want is not None:
        assert got == want, (want, got)


def test_server_still_serves_after_fuzzing(stub):
    r = stub.Chat(chat_pb2.ChatRequest(messages=[chat_pb2.Message(role="user", content="试用期多长？")],
                                       stopping=chat_pb2.StoppingCriteria(max_new_tokens=3, ignore_eos=True)),
                  timeout=30)
    assert r.usage.completion_tokens == 3


# -- blast radius: valid requests at every boundary, with ordinary streams beside them -----------------------
ORDINARY = "试用期最长可以约定多久？"


@pytest.fixture(scope="module")
def guarded(tiny_model):
    """A server whose breaker opens on the first counted failure: any harm done to the engine shows."""
    from lawchat_client import LawchatClient, NO_RETRY

    from lawchat_server.breaker import BreakerConfig
    runner = load_runner(tiny_model, device="cpu")
    srv = InProcessServer(runner, ServerConfig(port=0, breaker=BreakerConfig(failure_threshold=1)))
    client = LawchatClient(srv.target, timeout=120, retry=NO_RETRY)
    reference = client.chat(ORDINARY, max_new_tokens=8, ignore_eos=True).text
    def fits(n: int) -> bool:             # a prompt leaves room for at least one token
        return len(runner.encode_chat([{"role": "user", "content": "法" * n}])) < runner.max_len
    room = [n for n in range(1, 600) if not fits(n)][0]     # "法" * room is the first prompt that does not fit
    yield srv, client, reference, runner.vocab_size, room, fits
    client.close()
    srv.stop()


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(temperature=st.sampled_from([1e-6, 0.7, 1.0, 2.0]), top_p=st.sampled_from([1e-6, 0.3, 1.0]),
       top_k=st.sampled_from([0, 1, "V-1", "V", "V+1", 2**31, 2**32 - 1]),
       seed=st.one_of(st.integers(2**63 - 2, 2**63 + 1), st.integers(2**64 - 3, 2**64 - 1), st.just(0)),
       max_new=st.sampled_from([1, 2, 16, 16, D.max_new_tokens_limit]),
       length=st.sampled_from([4, "room-2", "room-1", "room", "room+1"]),
       stops=st.sampled_from([[], ["。"], ["法" * D.max_stop_sequence_chars], ["\ufffd", "的"]]))
def test_boundary_requests_never_hurt_the_streams_beside_them(guarded, temperature, top_p, top_k, seed, max_new,
                                                               length, stops):
    """Sampling on, seeds near 2**63 and 2**64, top_k around the vocabulary, prompts around max_len, the largest
    max_new_tokens: the request gets OK or INVALID_ARGUMENT naming its field; two ordinary greedy streams running
    beside it give their usual answer; the breaker (threshold 1) never counts a failure."""
    from concurrent.futures import ThreadPoolExecutor

    from lawchat_client import LawchatError
    srv, client, reference, vocab, room, fits = guarded
    top_k = {"V-1": vocab - 1, "V": vocab, "V+1": vocab + 1}.get(top_k, top_k)
    n = length if isinstance(length, int) else room + int(length[4:] or 0)
    want_field = "prompt" if not fits(n) else "top_k" if top_k > vocab else None

    def hostile():
        try:
            r = client.chat("法" * n, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            max_new_tokens=max_new, stop=stops)
            return "OK", r
        except LawchatError as e:
            return e.code.name, e.details

    def ordinary():
        return "".join(client.chat_stream(ORDINARY, max_new_tokens=8, ignore_eos=True))
    with ThreadPoolExecutor(3) as pool:
        neighbours = [pool.submit(ordinary) for _ in range(2)]
        code, detail = pool.submit(hostile).result(120)
        assert [f.result(120) for f in neighbours] == [reference, reference]
    if want_field is None:
        assert code == "OK" and not detail.degraded and detail.completion_tokens >= 1, (code, detail)
    else:
        assert code == "INVALID_ARGUMENT" and want_field in detail, (code, detail)
    b = srv.app.breaker
    assert (b.state, b.failures) == ("closed", 0)
