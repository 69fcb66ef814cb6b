"""Scale-out with a real balancer: deploy/envoy.yaml runs the real Envoy binary in front of two real lawchat
replicas (tiny model); streams go through Envoy; one replica is killed mid-run."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import pytest
import yaml
from lawchat_client import NO_RETRY, LawchatClient, LawchatError

from conftest import BIN, ROOT, start_server
from test_sdk import requests_served

pytestmark = pytest.mark.slow
ENVOY = BIN / "envoy"
QUESTION = "试用期最长可以约定多久？"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def envoy_config(replicas: list[str], port: int, admin_port: int, http_replicas: list[str] = (),
                 http_port: int = 0) -> dict:
    """deploy/envoy.yaml as shipped, with loopback ports and the replicas' addresses filled in (gRPC, and the
    OpenAI-compatible HTTP API's)."""
    cfg = yaml.safe_load((ROOT / "deploy" / "envoy.yaml").read_text(encoding="utf-8"))
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin_port
    for listener, cluster, ports, lport in zip(cfg["static_resources"]["listeners"], cfg["static_resources"]["clusters"],
                                               (replicas, http_replicas), (port, http_port)):
        listener["address"]["socket_address"].update(address="127.0.0.1", port_value=lport)
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(p)}}}}
            for host, p in (r.rsplit(":", 1) for r in ports)]
    return cfg


def openai_target(srv) -> str:
    return re.search(r"openai=http://(\S+)/v1", "".join(srv.stdout_lines)).group(1)


def running(srv) -> int:
    body = urllib.request.urlopen(srv.metrics_url, timeout=5).read().decode()
    return int(float(re.search(r"^lawchat_requests_running (\S+)", body, re.M).group(1)))


def healthy_hosts(admin_port: int, cluster: str = "lawchat") -> int:
    body = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters", timeout=2).read().decode()
    return sum(1 for line in body.splitlines()
               if line.startswith(f"{cluster}::") and "::health_flags::healthy" in line)


def envoy_hosts(admin_port: int, cluster: str = "lawchat") -> str:
    """Envoy's view of the replicas (health, requests), for a failure's message."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters", timeout=2).read().decode()
    return "\n".join(line for line in body.splitlines() if line.startswith(f"{cluster}::") and any(k in line for k in (
        "health_flags", "rq_total", "rq_error", "cx_connect_fail", "rq_active")))


def start_long_streams(client, n: int) -> tuple[list[threading.Thread], list]:
    """n 400-token streams through `client`, returned once each has its first token; each thread appends
    ("OK", tokens) or (status name, None) to the list when its stream ends."""
    outcomes: list = []
    started = threading.Barrier(n + 1)

    def long_stream():
        stream = client.chat_stream(QUESTION, max_new_tokens=400, ignore_eos=True)
        try:
            it = iter(stream)
            next(it)
            started.wait(30)
            for _ in it:
                pass
            outcomes.append(("OK", stream.completion_tokens))
        except LawchatError as e:
            outcomes.append((e.code.name, None))
    threads = [threading.Thread(target=long_stream) for _ in range(n)]
    for t in threads:
        t.start()
    started.wait(30)
    return threads, outcomes


@pytest.fixture
def two_replicas_behind_envoy(tiny_model, tmp_path):
    a = start_server(tiny_model, tmp_path / "a.log", "--http-port", "0")
    b = start_server(tiny_model, tmp_path / "b.log", "--http-port", "0")
    port, admin_port, http_port = free_port(), free_port(), free_port()
    conf = tmp_path / "envoy.yaml"
    conf.write_text(yaml.safe_dump(envoy_config([a.target, b.target], port, admin_port,
                                                [openai_target(a), openai_target(b)], http_port)), encoding="utf-8")
    log = (tmp_path / "envoy.log").open("w")
    envoy = subprocess.Popen([str(ENVOY), "-c", str(conf), "--base-id", str(port), "-l", "warning"],
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if healthy_hosts(admin_port) == 2 and healthy_hosts(admin_port, "lawchat_openai") == 2:
                    break
            except OSError:
                pass
            assert envoy.poll() is None and time.monotonic() < deadline, (tmp_path / "envoy.log").read_text()
            time.sleep(0.2)
        yield f"127.0.0.1:{port}", a, b, admin_port, f"127.0.0.1:{http_port}"
    finally:
        envoy.terminate()
        envoy.wait(10)
        a.stop(signal.SIGKILL)
        b.stop(signal.SIGKILL)


def test_shipped_envoy_config_is_valid():
    r = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(ROOT / "deploy" / "envoy.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "OK" in r.stdout + r.stderr, r.stdout + r.stderr


def test_streams_through_envoy_survive_losing_a_replica(two_replicas_behind_envoy):
    target, a, b, admin_port, _ = two_replicas_behind_envoy
    client = LawchatClient(target, retry=NO_RETRY, timeout=60)
    for _ in range(20):                        # through Envoy, spread over both replicas (least-request draws
        stream = client.chat_stream(QUESTION, max_new_tokens=8)    # two at random: an idle pair is a coin toss)
        assert "".join(stream) and stream.completion_tokens == 8
        if requests_served(a) >= 1 and requests_served(b) >= 1:
            break
    assert requests_served(a) >= 1 and requests_served(b) >= 1, envoy_hosts(admin_port)

    # long streams in flight on both replicas, then replica a is killed
    threads, outcomes = start_long_streams(client, 6)
    on_a = running(a)
    a.stop(signal.SIGKILL)
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a stream hung after its replica died"
    assert len(outcomes) == 6
    assert {code for code, _ in outcomes} <= {"OK", "UNAVAILABLE", "INTERNAL"}, outcomes
    assert ("OK", 400) in outcomes                        # streams on the surviving replica finished whole
    assert 0 < on_a < 6 and sum(code != "OK" for code, _ in outcomes) == on_a   # those on a ended with a status

    # new streams keep succeeding (no client retries: Envoy's health checks and retries route around a)
    before = requests_served(b)
    for _ in range(6):
        stream = client.chat_stream(QUESTION, max_new_tokens=8)
        assert "".join(stream) and stream.completion_tokens == 8
    assert requests_served(b) == before + 6
    deadline = time.monotonic() + 10
    while healthy_hosts(admin_port) != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert healthy_hosts(admin_port) == 1                 # Envoy's gRPC health check marked a down
    client.close()


def test_health_check_through_envoy_with_grpcurl(two_replicas_behind_envoy):
    target = two_replicas_behind_envoy[0]
    r = subprocess.run([str(BIN / "grpcurl"), "-plaintext", "-d", '{"service":"lawchat.v1.ChatService"}', target,
                        "grpc.health.v1.Health/Check"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and '"SERVING"' in r.stdout, r.stdout + r.stderr


def test_envoy_takes_a_draining_replica_out_by_its_grpc_health(two_replicas_behind_envoy):
    """A drained replica still accepts TCP; only grpc.health.v1 says NOT_SERVING — Envoy must act on that."""
    target, a, b, admin_port, _ = two_replicas_behind_envoy
    with LawchatClient(a.target, retry=NO_RETRY) as direct:
        direct.drain(timeout_seconds=0.1, timeout=10)
    deadline = time.monotonic() + 10
    while healthy_hosts(admin_port) != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert healthy_hosts(admin_port) == 1
    served_a, served_b = requests_served(a), requests_served(b)
    with LawchatClient(target, retry=NO_RETRY, timeout=30) as client:
        for _ in range(6):
            assert client.chat(QUESTION, max_new_tokens=4).completion_tokens == 4
    assert requests_served(a) == served_a and requests_served(b) == served_b + 6


def test_a_replica_whose_engine_dies_leaves_the_pool_and_only_its_streams_fail(two_replicas_behind_envoy):
    """Replica a's engine process is killed (SIGKILL) while streams run on both replicas. Only the streams
    already on a end (UNAVAILABLE); every request started afterwards succeeds with the model's answer: a says
    NOT_SERVING on lawchat.v1.ChatService (Envoy's health check takes it out), and until Envoy has seen that,
    a answers Envoy's marked attempts with UNAVAILABLE so that Envoy retries them on b. Then a's supervisor
    brings its engine back."""
    from test_server import chat_health, engine_child
    target, a, b, admin_port, _ = two_replicas_behind_envoy
    client = LawchatClient(target, retry=NO_RETRY, timeout=60)
    threads, outcomes = start_long_streams(client, 6)
    on_a = running(a)
    os.kill(engine_child(a), signal.SIGKILL)
    late = []                                  # requests started after the kill, before Envoy can know
    for _ in range(12):
        r = client.chat(QUESTION, max_new_tokens=4, ignore_eos=True)
        late.append((r.completion_tokens, r.degraded))
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a stream hung after its replica's engine died"
    assert 0 < on_a < 6, envoy_hosts(admin_port)
    assert sorted(outcomes) == sorted([("OK", 400)] * (6 - on_a) + [("UNAVAILABLE", None)] * on_a)
    assert late == [(4, False)] * 12           # no client beyond those on a saw the failure, not even canned text
    deadline = time.monotonic() + 10
    while healthy_hosts(admin_port) != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert healthy_hosts(admin_port) == 1
    deadline = time.monotonic() + 60           # a's supervisor restarts its engine
    while chat_health(a.target) != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    with LawchatClient(a.target, retry=NO_RETRY, timeout=30) as direct:
        r = direct.chat(QUESTION, max_new_tokens=4, ignore_eos=True)
        assert r.completion_tokens == 4 and not r.degraded
    client.close()


def test_openai_sdk_through_envoy_reaches_both_replicas(two_replicas_behind_envoy):
    """deploy/envoy.yaml routes the OpenAI-compatible HTTP port too (its own listener and health-checked cluster)."""
    import openai
    _, a, b, admin_port, http_target = two_replicas_behind_envoy
    client = openai.OpenAI(base_url=f"http://{http_target}/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    before = requests_served(a), requests_served(b)
    for _ in range(20):                        # least-request over two idle replicas: a coin toss each
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=4)
        assert r.usage.completion_tokens >= 1 and not r.lawchat["degraded"]
        if requests_served(a) > before[0] and requests_served(b) > before[1]:
            break
    assert requests_served(a) > before[0] and requests_served(b) > before[1], envoy_hosts(admin_port, "lawchat_openai")
