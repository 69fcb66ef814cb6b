"""API keys with scopes, TLS and mTLS on a real in-process server; certificates are made here, keys by `lawchat keys`."""
from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lawchat_client import LawchatClient, LawchatError, NO_RETRY

from faults import InProcessServer
from lawchat_server.auth import AuthConfig, TlsConfig
from lawchat_server.config import ServerConfig
from lawchat_server.engine.model_runner import load_runner

BIN = Path(sys.executable).parent
QUESTION = "劳动合同法第三十九条是怎么规定的？"


@pytest.fixture(scope="module")
def runner(tiny_model):
    return load_runner(tiny_model, device="cpu")


def make_key(name: str, scope: str, env=None) -> tuple[str, str]:
    """`lawchat keys new` as a user runs it: (the key, the line for the keys file)."""
    r = subprocess.run([str(BIN / "lawchat"), "keys", "new", name, "--scope", scope], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    return r.stderr.strip().splitlines()[-1], r.stdout.strip()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    (chat_key, chat_line), (admin_key, admin_line) = make_key("alice", "chat"), make_key("ops", "chat,admin")
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"# lawchat keys\n{chat_line}\n{admin_line}\n")
    assert chat_key not in path.read_text() and admin_key not in path.read_text()   # stored hashed only
    return path, chat_key, admin_key


@pytest.fixture(scope="module")
def auth_server(runner, keys):
    srv = InProcessServer(runner, ServerConfig(port=0, auth=AuthConfig(enabled=True, keys_file=str(keys[0]))))
    yield srv
    srv.stop()


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(LawchatError) as e:
        fn()
    return e.value.code


def test_keys_and_scopes(auth_server, keys):
    _, chat_key, admin_key = keys
    t = auth_server.target
    with LawchatClient(t, timeout=30, api_key="", retry=NO_RETRY) as anon, LawchatClient(t, timeout=30, api_key="lc_wrong", retry=NO_RETRY) as wrong, \
            LawchatClient(t, timeout=30, api_key=chat_key, retry=NO_RETRY) as alice, LawchatClient(t, timeout=30, api_key=admin_key, retry=NO_RETRY) as ops:
        for c in (anon, wrong):
            assert code_of(lambda: c.chat(QUESTION, max_new_tokens=2)) == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(lambda: list(c.chat_stream(QUESTION, max_new_tokens=2))) == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(c.status) == grpc.StatusCode.UNAUTHENTICATED
        assert alice.chat(QUESTION, max_new_tokens=2, ignore_eos=True).completion_tokens == 2
        assert code_of(alice.status) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: alice.set_degraded(True)) == grpc.StatusCode.PERMISSION_DENIED
        assert ops.status()["auth_enabled"] is True
        assert "".join(ops.chat_stream(QUESTION, max_new_tokens=2))
    with grpc.insecure_channel(t) as ch:                       # health stays open
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_rate_limits_are_kept_per_key(runner, keys):
    from lawchat_server.limiter import LimitsConfig, Rate
    cfg = ServerConfig(port=0, auth=AuthConfig(enabled=True, keys_file=str(keys[0])),
                       limits=LimitsConfig(client_requests=Rate(rate=0.01, burst=1)))
    srv = InProcessServer(runner, cfg)
    try:
        with LawchatClient(srv.target, api_key=keys[1], retry=NO_RETRY) as alice, LawchatClient(srv.target, api_key=keys[2], retry=NO_RETRY) as ops:
            alice.chat(QUESTION, max_new_tokens=1)
            assert code_of(lambda: alice.chat(QUESTION, max_new_tokens=1)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert ops.chat(QUESTION, max_new_tokens=1, ignore_eos=True).completion_tokens == 1   # its own bucket
    finally:
        srv.stop()


def test_grpcurl_with_api_key_header_and_env_key(auth_server, keys, monkeypatch):
    _, chat_key, admin_key = keys
    body = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "stopping": {"max_new_tokens": 4}},
                      ensure_ascii=False)
    run = lambda *a: subprocess.run([str(BIN / "grpcurl"), "-plaintext", *a], capture_output=True, text=True,  # noqa
                                    timeout=60)
    r = run("-d", body, auth_server.target, "lawchat.v1.ChatService/ChatStream")
    assert r.returncode != 0 and "Unauthenticated" in r.stderr
    r = run("-H", f"x-api-key:{chat_key}", "-d", body, auth_server.target, "lawchat.v1.ChatService/ChatStream")
    assert r.returncode == 0, r.stderr
    assert "FINISH_REASON" in r.stdout
    r = run("-H", f"x-api-key:{admin_key}", "-d", '{"enabled": true, "reason": "test"}', auth_server.target,
            "lawchat.v1.AdminService/SetDegraded")
    assert r.returncode == 0 and json.loads(r.stdout)["degraded"]["enabled"] is True
    r = run("-H", f"x-api-key:{admin_key}", "-d", '{"enabled": false}', auth_server.target,
            "lawchat.v1.AdminService/SetDegraded")
    assert r.returncode == 0, r.stderr
    r = run(auth_server.target, "list")                          # reflection stays open
    assert r.returncode == 0 and "lawchat.v1.ChatService" in r.stdout
    # the CLI takes the key from LAWCHAT_API_KEY
    monkeypatch.setenv("LAWCHAT_API_KEY", chat_key)
    r = subprocess.run([str(BIN / "lawchat-client"), "--target", auth_server.target, "chat", QUESTION,
                        "--max-new-tokens", "3"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(BIN / "lawchat-client"), "--target", auth_server.target, "status"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr


def test_auth_on_without_keys_is_a_config_error(runner, monkeypatch):
    from lawchat_server.app import build_app
    from lawchat_server.engine_slot import EngineSlot
    monkeypatch.delenv("LAWCHAT_API_KEYS", raising=False)
    with pytest.raises(ValueError, match="no keys were found"):
        build_app(ServerConfig(port=0, auth=AuthConfig(enabled=True)), EngineSlot())
    monkeypatch.setenv("LAWCHAT_API_KEYS", "bob chat 1234")
    with pytest.raises(ValueError, match="SHA-256"):
        build_app(ServerConfig(port=0, auth=AuthConfig(enabled=True)), EngineSlot())


def test_keys_turn_auth_on_and_an_explicit_false_beside_them_is_refused(runner, keys, monkeypatch):
    from lawchat_server.app import build_app
    from lawchat_server.engine_slot import EngineSlot
    monkeypatch.delenv("LAWCHAT_API_KEYS", raising=False)
    srv = InProcessServer(runner, ServerConfig(port=0, auth=AuthConfig(keys_file=str(keys[0]))))   # enabled unset
    try:
        with LawchatClient(srv.target, retry=NO_RETRY) as anonymous:
            with pytest.raises(LawchatError) as e:
                anonymous.chat(QUESTION, max_new_tokens=1)
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="keys always turn auth on"):
        build_app(ServerConfig(port=0, auth=AuthConfig(enabled=False, keys_file=str(keys[0]))), EngineSlot())


def serve_cmd(tiny_model, *extra) -> list[str]:
    return [str(BIN / "lawchat"), "serve", "--model", str(tiny_model), "--port", "0", "--metrics-port", "0", *extra]


def test_a_non_loopback_address_needs_keys_or_an_explicit_flag(tiny_model, keys, tmp_path):
    """127.0.0.2 stands for any address other machines could reach (it is not 127.0.0.1/localhost/::1)."""
    import os

    from conftest import start_server
    env = {k: v for k, v in os.environ.items() if k != "LAWCHAT_API_KEYS"}
    r = subprocess.run(serve_cmd(tiny_model, "--host", "127.0.0.2"), capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 2 and "refusing to listen on 127.0.0.2 without API keys" in r.stderr, r.stderr
    srv = start_server(tiny_model, tmp_path / "open.log", "--host", "127.0.0.2", "--allow-unauthenticated")
    try:
        assert "AUTH IS OFF" in srv.log_text() and "--allow-unauthenticated" in srv.log_text()
    finally:
        srv.stop()
    srv = start_server(tiny_model, tmp_path / "keys.log", "--host", "127.0.0.2", "--api-keys-file", str(keys[0]))
    try:
        with LawchatClient(srv.target, retry=NO_RETRY) as anonymous, \
                LawchatClient(srv.target, api_key=keys[1], retry=NO_RETRY, timeout=60) as alice:
            with pytest.raises(LawchatError) as e:
                anonymous.chat(QUESTION, max_new_tokens=1)
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert alice.chat(QUESTION, max_new_tokens=2, ignore_eos=True).completion_tokens == 2
            with pytest.raises(LawchatError) as e:
                alice.status()
            assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    finally:
        srv.stop()


# -- TLS -----------------------------------------------------------------------------------------------------
def _cert(subject: str, issuer_key, issuer_name, key, ca: bool, sans=()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def write_pki(d: Path, name: str) -> dict:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, as PEM files."""
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)   # noqa: E731
    keypem = lambda k: k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,  # noqa: E731
                                       serialization.NoEncryption())
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = _cert(f"{name} CA", ca_key, ca_name, ca_key, True)
    files = {}
    for who, sans in (("server", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                      ("client", [x509.DNSName("lawyer-laptop")])):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(who, ca_key, ca_name, key, False, sans)
        (d / f"{name}-{who}.pem").write_bytes(pem(cert))
        (d / f"{name}-{who}.key").write_bytes(keypem(key))
        files[who] = (str(d / f"{name}-{who}.pem"), str(d / f"{name}-{who}.key"))
    (d / f"{name}-ca.pem").write_bytes(pem(ca))
    files["ca"] = str(d / f"{name}-ca.pem")
    return files


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    return write_pki(d, "lawchat"), write_pki(d, "other")


def test_tls_and_mtls_handshakes(runner, pki):
    ours, other = pki
    cert, key = ours["server"]
    tls = InProcessServer(runner, ServerConfig(port=0, tls=TlsConfig(cert_file=cert, key_file=key)))
    mtls = InProcessServer(runner, ServerConfig(port=0, tls=TlsConfig(cert_file=cert, key_file=key,
                                                                      client_ca_file=ours["ca"])))
    try:
        with LawchatClient(tls.target, timeout=10, tls_ca=ours["ca"], retry=NO_RETRY) as c:
            assert c.chat(QUESTION, max_new_tokens=2, ignore_eos=True).completion_tokens == 2
        with LawchatClient(tls.target, timeout=5, retry=NO_RETRY) as plain:            # plaintext to a TLS port fails
            assert code_of(lambda: plain.chat(QUESTION, max_new_tokens=2)) == grpc.StatusCode.UNAVAILABLE
        with LawchatClient(tls.target, timeout=5, tls_ca=other["ca"], retry=NO_RETRY) as c:   # a server it does not trust
            assert code_of(lambda: c.chat(QUESTION, max_new_tokens=2)) == grpc.StatusCode.UNAVAILABLE

        with LawchatClient(mtls.target, timeout=10, tls_ca=ours["ca"], tls_cert=ours["client"][0],
                           tls_key=ours["client"][1], retry=NO_RETRY) as c:
            assert c.chat(QUESTION, max_new_tokens=2, ignore_eos=True).completion_tokens == 2
        with LawchatClient(mtls.target, timeout=5, tls_ca=ours["ca"], retry=NO_RETRY) as c:   # no client certificate
            assert code_of(lambda: c.chat(QUESTION, max_new_tokens=2)) == grpc.StatusCode.UNAVAILABLE
        with LawchatClient(mtls.target, timeout=5, tls_ca=ours["ca"], tls_cert=other["client"][0],
                           tls_key=other["client"][1], retry=NO_RETRY) as c:                 # a certificate from another CA
            assert code_of(lambda: c.chat(QUESTION, max_new_tokens=2)) == grpc.StatusCode.UNAVAILABLE
        # the CLI and grpcurl over TLS
        r = subprocess.run([str(BIN / "lawchat-client"), "--target", tls.target, "--tls-ca", ours["ca"], "chat",
                            QUESTION, "--max-new-tokens", "2"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        r = subprocess.run([str(BIN / "grpcurl"), "-cacert", ours["ca"], "-cert", ours["client"][0], "-key",
                            ours["client"][1], mtls.target, "grpc.health.v1.Health/Check"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "SERVING" in r.stdout, r.stderr
    finally:
        tls.stop()
        mtls.stop()
