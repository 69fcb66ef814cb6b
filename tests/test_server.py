"""A real `lawchat serve` process on loopback, driven by the SDK, the client CLI, real grpcurl and HTTP."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
import pytest
from lawchat_client import LawchatClient, LawchatError, NO_RETRY
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
QUESTION = "劳动合同法第三十九条是怎么规定的？"
SECRET = "我的身份证号是110101199003078888，请问公司能辞退我吗"


def grpcurl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "grpcurl"), *args], capture_output=True, text=True, timeout=timeout)


def metrics_text(server) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        return r.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format; 0 when the labelled series does not exist yet."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    if labels:
        return 0.0
    raise AssertionError(f"{name} not in /metrics")


def test_sdk_stream_deltas_and_final_message(server):
    with LawchatClient(server.target, timeout=60, retry=NO_RETRY) as c:
        stream = c.chat_stream(QUESTION, max_new_tokens=48, request_id="req-stream-1")
        deltas = list(stream)
        assert stream.request_id == "req-stream-1"
        assert len(deltas) >= 2 and all(deltas)
        assert all("\ufffd" not in d for d in deltas)
        assert stream.finish_reason in ("eos", "max_tokens")
        assert stream.prompt_tokens > 5 and 1 <= stream.completion_tokens <= 48
        # greedy by default: the unary RPC gives the same text
        whole = c.chat(QUESTION, max_new_tokens=48)
        assert whole.text == "".join(deltas)
        assert (whole.finish_reason, whole.completion_tokens) == (stream.finish_reason, stream.completion_tokens)
        assert whole.request_id  # made by the server when the client sends none


def test_max_tokens_and_stop_sequence(server):
    with LawchatClient(server.target, timeout=60, retry=NO_RETRY) as c:
        r = c.chat(QUESTION, max_new_tokens=5)
        assert (r.finish_reason, r.completion_tokens) == ("max_tokens", 5)
        full = c.chat(QUESTION, max_new_tokens=40).text
        assert len(full) >= 4
        stop = full[2:4]
        cut = c.chat(QUESTION, max_new_tokens=40, stop=[stop])
        assert cut.finish_reason == "stop_sequence"
        assert cut.text == full[:full.index(stop)]
        # sampling with a seed repeats
        a = c.chat(QUESTION, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=123).text
        b = c.chat(QUESTION, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=123).text
        assert a == b


@pytest.mark.parametrize("messages,params,needle", [
    ([], {}, "messages is empty"),
    ([{"role": "lawyer", "content": "hi"}], {}, "role must be one of"),
    ([{"role": "user", "content": "  "}], {}, "content is empty"),
    ([{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}], {}, "last message"),
    ([{"role": "user", "content": "问"}], {"temperature": 5.0}, "temperature must be in [0, 2]"),
    ([{"role": "user", "content": "问"}], {"top_p": 0.0}, "top_p must be in (0, 1]"),
    ([{"role": "user", "content": "问"}], {"max_new_tokens": 100000}, "max_new_tokens must be in"),
    ([{"role": "user", "content": "问" * 3000}], {}, "this model takes at most"),
])
def test_bad_requests_get_invalid_argument(server, messages, params, needle):
    with LawchatClient(server.target, timeout=30, retry=NO_RETRY) as c:
        with pytest.raises(LawchatError) as e:
            list(c.chat_stream(messages, **params))
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in e.value.details
        with pytest.raises(LawchatError) as e:
            c.chat(messages, **params)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_admin_status(server, tiny_model):
    with LawchatClient(server.target, retry=NO_RETRY) as c:
        s = c.status()
    assert s["model"] == tiny_model.name and s["device"] == "cpu" and s["dtype"] == "float32"
    assert s["uptime_seconds"] > 0 and s["version"]


def test_grpcurl_reflection_list_health_and_stream(server):
    r = grpcurl("-plaintext", server.target, "list")
    assert r.returncode == 0, r.stderr
    services = set(r.stdout.split())
    assert {"lawchat.v1.ChatService", "lawchat.v1.AdminService", "grpc.health.v1.Health"} <= services

    r = grpcurl("-plaintext", server.target, "describe", "lawchat.v1.ChatService")
    assert "rpc ChatStream" in r.stdout and "stream .lawchat.v1.ChatStreamResponse" in r.stdout

    r = grpcurl("-plaintext", server.target, "grpc.health.v1.Health/Check")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "SERVING"

    body = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "stopping": {"max_new_tokens": 32}},
                      ensure_ascii=False)
    r = grpcurl("-plaintext", "-d", body, server.target, "lawchat.v1.ChatService/ChatStream")
    assert r.returncode == 0, r.stderr
    decoder, text, msgs, i = json.JSONDecoder(), r.stdout, [], 0
    while i < len(text):                       # grpcurl prints one JSON object per message
        if text[i].isspace():
            i += 1
            continue
        obj, i = decoder.raw_decode(text, i)
        msgs.append(obj)
    assert len(msgs) >= 2
    assert msgs[-1]["finish_reason"] in ("FINISH_REASON_EOS_TOKEN", "FINISH_REASON_MAX_TOKENS")
    assert msgs[-1]["usage"]["completion_tokens"] >= 1
    assert all("finish_reason" not in m for m in msgs[:-1])
    streamed = "".join(m.get("delta", "") for m in msgs)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in streamed)   # Chinese text came through

    r = grpcurl("-plaintext", "-d", '{"messages":[]}', server.target, "lawchat.v1.ChatService/ChatStream")
    assert r.returncode != 0 and "InvalidArgument" in r.stderr


def test_metrics_over_http(server):
    before = metrics_text(server)
    with LawchatClient(server.target, timeout=60, retry=NO_RETRY) as c:
        n = c.chat(QUESTION, max_new_tokens=7).completion_tokens
        with pytest.raises(LawchatError):
            c.chat([])
    def settled(text):   # the server counts an RPC as its handler ends, which can trail the client by a moment
        return all(metric_value(text, "lawchat_requests_total", method="Chat", code=code) >
                   metric_value(before, "lawchat_requests_total", method="Chat", code=code)
                   for code in ("OK", "INVALID_ARGUMENT"))

    deadline = time.monotonic() + 5
    after = metrics_text(server)
    while not settled(after) and time.monotonic() < deadline:
        time.sleep(0.05)
        after = metrics_text(server)
    for code in ("OK", "INVALID_ARGUMENT"):
        assert metric_value(after, "lawchat_requests_total", method="Chat", code=code) == \
            metric_value(before, "lawchat_requests_total", method="Chat", code=code) + 1
    assert metric_value(after, "lawchat_generation_tokens_total") >= \
        metric_value(before, "lawchat_generation_tokens_total") + n
    assert metric_value(after, "lawchat_time_to_first_token_seconds_count") >= 1
    assert metric_value(after, "lawchat_requests_running") == 0
    assert metric_value(after, "lawchat_request_generation_tokens_sum") - \
        metric_value(before, "lawchat_request_generation_tokens_sum") == n
    assert metric_value(after, "lawchat_request_queue_time_seconds_count") - \
        metric_value(before, "lawchat_request_queue_time_seconds_count") == 1
    assert metric_value(after, "lawchat_request_queue_time_seconds_sum") > \
        metric_value(before, "lawchat_request_queue_time_seconds_sum")      # measured in the engine process


def test_client_cli_streams_to_terminal(server):
    r = subprocess.run([str(BIN / "lawchat-client"), "--target", server.target, "chat", QUESTION,
                        "--max-new-tokens", "20", "--usage"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "finish=" in r.stderr and "completion_tokens=" in r.stderr
    r = subprocess.run([str(BIN / "lawchat-client"), "--target", server.target, "chat", QUESTION,
                        "--temperature", "9"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr


def test_prompt_text_never_logged(server):
    with LawchatClient(server.target, timeout=60, retry=NO_RETRY) as c:
        answer = c.chat(SECRET, max_new_tokens=8, request_id="secret-check").text
    time.sleep(0.3)
    log = server.log_text()
    assert "request_id=secret-check" in log      # the request was logged ...
    assert "110101199003078888" not in log and SECRET not in log   # ... without its text
    assert not answer.strip() or answer.strip() not in log


def test_sigterm_exits_cleanly_and_port_clash_is_an_error(tiny_model, tmp_path, server):
    from conftest import start_server
    host, port = server.target.rsplit(":", 1)
    r = subprocess.run([str(BIN / "lawchat"), "serve", "--model", str(tiny_model), "--port", port,
                        "--metrics-port", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot listen" in r.stderr

    own = start_server(tiny_model, tmp_path / "own.log")
    assert own.stop() == 0
    assert "stopped" in own.log_text()


@pytest.mark.parametrize("args,needle", [
    (["--model", "/nonexistent/model"], "not a model directory"),
    (["--model", "{model}", "--device", "cuda:7"], "CUDA is not available"),
    (["--model", "{model}", "--dtype", "float8"], "dtype must be auto or one of"),
])
def test_serve_bad_arguments_exit_2(tiny_model, args, needle):
    args = [a.replace("{model}", str(tiny_model)) for a in args]
    r = subprocess.run([str(BIN / "lawchat"), "serve", "--port", "0", "--metrics-port", "0", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr


def read_or_empty(path: Path) -> str:
    """A /proc file of a thread or process that may exit while it is read (gRPC's threads come and go)."""
    try:
        return path.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def engine_child(srv) -> int:
    """pid of the server's engine process (a spawned child; multiprocessing's resource tracker is the other)."""
    pid = srv.proc.pid
    kids = {int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in read_or_empty(t / "children").split()}
    engines = [k for k in kids if "spawn_main" in read_or_empty(Path(f"/proc/{k}/cmdline"))]
    assert len(engines) == 1, kids
    return engines[0]


def chat_health(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="lawchat.v1.ChatService"),
                                                     timeout=5).status


def test_engine_process_killed_under_load_is_restarted(tiny_model, tmp_path):
    """SIGKILL the engine process with streams in flight: they end UNAVAILABLE saying why, nothing hangs, new
    requests get the canned answer meanwhile, ChatService health goes NOT_SERVING, and the supervisor brings
    the model back within a bounded time."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import start_server
    srv = start_server(tiny_model, tmp_path / "own.log")
    try:
        child = engine_child(srv)
        with LawchatClient(srv.target, timeout=30, retry=NO_RETRY) as c, ThreadPoolExecutor(4) as pool:
            # the engine's answer crosses the process boundary intact
            r = c.chat(QUESTION, max_new_tokens=12, ignore_eos=True)
            assert r.completion_tokens == 12 and r.text and not r.degraded
            streams = [c.chat_stream(QUESTION, max_new_tokens=2000, ignore_eos=True) for _ in range(4)]
            its = [iter(s) for s in streams]
            for it in its:
                next(it)
            os.kill(child, signal.SIGKILL)              # the engine process dies mid-stream, under load
            for fut in [pool.submit(list, it) for it in its]:
                with pytest.raises(LawchatError) as e:
                    fut.result(30)                      # bounded: nothing hangs
                assert e.value.code == grpc.StatusCode.UNAVAILABLE and "restarts it" in e.value.details
            t0 = time.monotonic()
            saw_not_serving = chat_health(srv.target) == health_pb2.HealthCheckResponse.NOT_SERVING
            degraded = 0
            while True:                                 # canned answers meanwhile, then the model again
                r = c.chat(QUESTION, max_new_tokens=3, ignore_eos=True, timeout=10)
                if not r.degraded:
                    break
                degraded += 1
                saw_not_serving |= chat_health(srv.target) == health_pb2.HealthCheckResponse.NOT_SERVING
                assert time.monotonic() - t0 < 60, "the engine was not restarted"
                time.sleep(0.2)
            assert r.completion_tokens == 3 and degraded >= 1 and saw_not_serving
            assert engine_child(srv) != child
            deadline = time.monotonic() + 5               # health is polled every 0.5 s
            while chat_health(srv.target) != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert "engine restarted" in srv.log_text()
    finally:
        srv.stop()


def test_server_exits_3_when_the_engine_cannot_be_restarted(tiny_model, tmp_path):
    """The model dir is gone when the engine dies: restarts fail, the server gives up and exits 3 (the
    orchestrator's cue), liveness NOT_SERVING first."""
    import shutil

    import yaml

    from conftest import ROOT, start_server
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    cfg = yaml.safe_load((ROOT / "configs" / "server.yaml").read_text(encoding="utf-8"))
    cfg["restart"].update(max_restarts=2, backoff_seconds=0.1, backoff_max_seconds=0.2)
    (tmp_path / "server.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    srv = start_server(model, tmp_path / "own.log", "--config", str(tmp_path / "server.yaml"))
    try:
        shutil.rmtree(model)
        os.kill(engine_child(srv), signal.SIGKILL)
        assert srv.proc.wait(60) == 3
        assert "giving up on the engine (2 engine restarts" in srv.log_text()
    finally:
        srv.stop()


def test_full_queue_of_the_engine_process_is_resource_exhausted(tiny_model, tmp_path):
    """The engine process's wait bound crosses the pipe: one running, one waiting, the third is refused."""
    import yaml
    from concurrent.futures import ThreadPoolExecutor

    from conftest import ROOT, start_server
    cfg = yaml.safe_load((ROOT / "configs" / "server.yaml").read_text(encoding="utf-8"))
    cfg["engine"].update(max_num_seqs=1, max_waiting=1)
    (tmp_path / "server.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    srv = start_server(tiny_model, tmp_path / "own.log", "--config", str(tmp_path / "server.yaml"))
    try:
        with LawchatClient(srv.target, timeout=120, retry=NO_RETRY) as c, ThreadPoolExecutor(2) as pool:
            first = c.chat_stream(QUESTION, max_new_tokens=2000, ignore_eos=True)
            it = iter(first)
            next(it)                                                    # running
            second = pool.submit(lambda: c.chat(QUESTION, max_new_tokens=3, ignore_eos=True))
            deadline = time.monotonic() + 10
            while c.status()["requests_waiting"] < 1:                  # waiting (stats cross every 0.5 s)
                assert time.monotonic() < deadline
                time.sleep(0.05)
            with pytest.raises(LawchatError) as e:
                c.chat(QUESTION, max_new_tokens=3)
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.value.retry_after > 0
            first.cancel()                                              # the slot frees, the waiting one runs
            assert second.result(60).completion_tokens == 3
    finally:
        srv.stop()


def test_a_frozen_engine_process_is_killed_and_restarted(tiny_model, tmp_path):
    """SIGSTOP freezes the engine process mid-stream (a hang, as a stuck kernel or driver would): the stream
    ends UNAVAILABLE after stall_seconds, the supervisor kills the frozen process and starts a new one."""
    import yaml

    from conftest import ROOT, start_server
    cfg = yaml.safe_load((ROOT / "configs" / "server.yaml").read_text(encoding="utf-8"))
    cfg["breaker"]["stall_seconds"] = 2
    (tmp_path / "server.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    srv = start_server(tiny_model, tmp_path / "own.log", "--config", str(tmp_path / "server.yaml"))
    try:
        child = engine_child(srv)
        with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c:
            stream = c.chat_stream(QUESTION, max_new_tokens=2000, ignore_eos=True)
            it = iter(stream)
            next(it)
            os.kill(child, signal.SIGSTOP)
            t0 = time.monotonic()
            with pytest.raises(LawchatError) as e:
                list(it)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE and time.monotonic() - t0 < 30
            deadline = time.monotonic() + 60
            while True:
                try:                  # UNAVAILABLE for a request that reached the process as it was killed
                    r = c.chat(QUESTION, max_new_tokens=3, ignore_eos=True, timeout=10)
                    if not r.degraded:
                        break
                except LawchatError as e:
                    assert e.code == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() < deadline, "the frozen engine was not replaced"
                time.sleep(0.2)
            assert engine_child(srv) != child
        assert "killing its process to restart it" in srv.log_text()
    finally:
        try:
            os.kill(child, signal.SIGCONT)
        except ProcessLookupError:
            pass
        srv.stop()
