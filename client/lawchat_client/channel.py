"""channel: one server, several servers (round_robin over the healthy ones), or a dns:/// name; TLS and mTLS.

Several servers: gRPC's own `round_robin` policy spreads calls over every address, and client-side health
checking (grpc.health.v1 Watch on `lawchat.v1.ChatService`) takes a replica out while it answers NOT_SERVING
(loading, draining, engine down) and back when it serves again. A list of host:port is resolved once, here;
a `dns:///name:port` target is re-resolved by gRPC (a Kubernetes headless Service, for instance).
"""
from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from pathlib import Path

import grpc

HEALTH_SERVICE = "lawchat.v1.ChatService"
SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}],
                             "healthCheckConfig": {"serviceName": HEALTH_SERVICE}})

Targets = str | Sequence[str]


def _split(hostport: str) -> tuple[str, str]:
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {hostport!r}")
    return host.strip("[]"), port


def resolve_targets(targets: Targets) -> str:
    """A target string gRPC understands: one address as given, or a list as `ipv4:`/`ipv6:` addresses."""
    if isinstance(targets, str):
        if "," not in targets:
            return targets
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not targets:
        raise ValueError("no server address given")
    if len(targets) == 1:
        return targets[0]
    v4, v6 = [], []
    for t in targets:
        host, port = _split(t)
        try:
            addrs = [ipaddress.ip_address(host)]
        except ValueError:
            addrs = [ipaddress.ip_address(a[4][0]) for a in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)]
        for a in dict.fromkeys(addrs):
            (v4 if a.version == 4 else v6).append(f"{a}:{port}" if a.version == 4 else f"[{a}]:{port}")
    if v4 and v6:
        raise ValueError("mix of IPv4 and IPv6 servers: give a dns:/// name instead")
    return "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)


def channel_options(target: str, server_name: str | None = None) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = []
    if target.startswith(("ipv4:", "ipv6:", "dns:")):   # several addresses: balance over the healthy ones
        options.append(("grpc.service_config", SERVICE_CONFIG))
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def credentials(tls_ca: str | None, tls_cert: str | None, tls_key: str | None, tls: bool):
    """None for plaintext; TLS credentials when any TLS option is given (tls=True alone: the system's roots)."""
    if not (tls or tls_ca or tls_cert or tls_key):
        return None
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("give both tls_cert and tls_key for a client certificate, or neither")
    read = lambda p: Path(p).read_bytes() if p else None   # noqa: E731
    return grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))


def make_channel(targets: Targets, *, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, tls: bool = False, server_name: str | None = None,
                 aio: bool = False):
    """A grpc.Channel (or grpc.aio.Channel with aio=True) to one or several servers."""
    target = resolve_targets(targets)
    creds = credentials(tls_ca, tls_cert, tls_key, tls)
    options = channel_options(target, server_name)
    mod = grpc.aio if aio else grpc
    if creds is None:
        return mod.insecure_channel(target, options=options)
    return mod.secure_channel(target, creds, options=options)
