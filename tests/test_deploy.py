"""deploy/k8s: the manifests pass the Kubernetes API schema (kubernetes-validate, strict) and fit together."""
from __future__ import annotations

import asyncio
import subprocess

import pytest
import yaml

from conftest import BIN, ROOT

K8S = ROOT / "deploy" / "k8s"


def manifests() -> dict[str, dict]:
    docs = [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text(encoding="utf-8")) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def validate(*paths) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "kubernetes-validate"), "--strict", *map(str, paths)], capture_output=True,
                          text=True, timeout=120)


def test_manifests_pass_the_kubernetes_schema(tmp_path):
    r = validate(*sorted(K8S.glob("*.yaml")))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("passed") == 4, r.stdout
    # the validator does reject a wrong manifest (a probe field that does not exist)
    bad = (K8S / "deployment.yaml").read_text(encoding="utf-8").replace("periodSeconds: 5", "periodSecs: 5", 1)
    (tmp_path / "bad.yaml").write_text(bad, encoding="utf-8")
    assert validate(tmp_path / "bad.yaml").returncode != 0


def test_manifests_fit_together():
    m = manifests()
    dep, pdb = m["Deployment/lawchat"], m["PodDisruptionBudget/lawchat"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    for svc in ("Service/lawchat", "Service/lawchat-headless"):
        assert m[svc]["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == ports["metrics"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == ports["grpc"]
    assert c["readinessProbe"]["grpc"]["service"] == "lawchat.v1.ChatService"
    args = c["args"]
    assert args[:2] == ["lawchat", "serve"] and args[args.index("--port") + 1] == str(ports["grpc"])
    assert args[args.index("--metrics-port") + 1] == str(ports["metrics"])
    assert args[args.index("--http-port") + 1] == str(ports["http"]) and args[args.index("--http-host") + 1] == "0.0.0.0"
    assert {"grpc", "http", "metrics"} <= {q["name"] for q in m["Service/lawchat"]["spec"]["ports"]}
    assert args[args.index("--metrics-host") + 1] == "0.0.0.0" and args[args.index("--host") + 1] == "0.0.0.0"
    # the args parse as a real `lawchat serve` command line
    from lawchat_cli.main import build_parser
    a = build_parser().parse_args(args[1:])
    assert a.model == "/models/merged" and a.device == "cuda"
    # SIGTERM drain fits in the pod's grace period
    grace = yaml.safe_load((ROOT / "configs" / "server.yaml").read_text(encoding="utf-8"))["grace_seconds"]
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace


def test_the_manifest_command_line_serves_locked(monkeypatch):
    """The Deployment's args and env, rendered as the pod would run them: auth on from the required Secret,
    0.0.0.0 accepted only because keys are there, probes on the health names that mean readiness and liveness."""
    from lawchat_cli.main import build_parser
    from lawchat_server.app import build_app, config_from_args
    from lawchat_server.auth import KeyStore, hash_key
    from lawchat_server.engine_slot import EngineSlot
    dep = manifests()["Deployment/lawchat"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    (env,) = [e for e in c["env"] if e["name"] == "LAWCHAT_API_KEYS"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "lawchat-api-keys", "key": "keys", "optional": False}
    assert c["readinessProbe"]["grpc"]["service"] == "lawchat.v1.ChatService"
    assert c["startupProbe"]["grpc"]["service"] == "lawchat.v1.ChatService"
    assert c["livenessProbe"]["grpc"]["service"] == "liveness"
    args = build_parser().parse_args(c["args"][1:])
    assert args.http_port is not None                     # the OpenAI-compatible API is served too
    args.port = args.metrics_port = args.http_port = 0    # the pod's ports, free ones here
    args.host = args.http_host = "127.0.0.2"              # not loopback-only, like the pod's 0.0.0.0
    cfg = config_from_args(args)
    assert not cfg.auth.allow_unauthenticated
    monkeypatch.delenv("LAWCHAT_API_KEYS", raising=False)

    async def build():                                    # grpc.aio servers belong to a running loop
        app = build_app(cfg, EngineSlot())
        try:
            assert app.keys.enabled and app.port > 0 and app.http.port > 0
        finally:
            await app.server.stop(0)
            app.http.sock.close()
    with pytest.raises(ValueError, match="without API keys"):   # the Secret missing: refused, not served open
        asyncio.run(build())
    monkeypatch.setenv("LAWCHAT_API_KEYS", f"ops chat,admin {hash_key('k1')}")   # what the Secret puts there
    assert KeyStore(cfg.auth).enabled
    asyncio.run(build())
