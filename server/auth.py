"""auth: API keys with scopes (checked by a gRPC interceptor) and TLS / mTLS server credentials.

Keys are stored hashed, one per line, in a file and/or an environment variable:

    # NAME   SCOPES       SHA-256 OF THE KEY
    alice    chat         9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    ops      chat,admin   60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752

`lawchat keys new NAME --scope chat` makes a key and prints the line. A presented key is hashed and compared
with every stored hash in constant time. ChatService needs scope `chat`, AdminService `admin`; health and
reflection stay open.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from .limiter import client_address

log = logging.getLogger("lawchat.auth")

SCOPES = ("chat", "admin")
SERVICE_SCOPES = {"lawchat.v1.ChatService": "chat", "lawchat.v1.AdminService": "admin"}


@dataclass
class AuthConfig:
    enabled: bool | None = None            # null: on whenever keys are configured; true: keys required
    keys_file: str | None = None           # lines "NAME SCOPES SHA256"
    keys_env: str = "LAWCHAT_API_KEYS"     # the same lines from this environment variable (';' also separates)
    allow_unauthenticated: bool = False    # serve a non-loopback address with no keys (a proxy authenticates)


@dataclass
class TlsConfig:
    cert_file: str | None = None           # PEM server certificate (chain); with key_file turns TLS on
    key_file: str | None = None            # PEM private key
    client_ca_file: str | None = None      # PEM CA: clients must present a certificate it signed (mTLS)

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file or self.key_file)

    def validate(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("tls: set both cert_file and key_file, or neither")
        if self.client_ca_file and not self.enabled:
            raise ValueError("tls.client_ca_file (mTLS) needs cert_file and key_file")
        for name in ("cert_file", "key_file", "client_ca_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"tls.{name}: no such file: {path}")


@dataclass(frozen=True)
class ApiKey:
    name: str
    scopes: frozenset
    sha256: bytes = field(repr=False)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return "lc_" + secrets.token_urlsafe(32)


def parse_keys(text: str, source: str) -> list[ApiKey]:
    keys = []
    for n, line in enumerate(text.replace(";", "\n").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ValueError(f"{source}:{n}: expected 'NAME SCOPES SHA256', got {len(parts)} fields")
        name, scopes, digest = parts
        bad = set(scopes.split(",")) - set(SCOPES)
        if bad:
            raise ValueError(f"{source}:{n}: unknown scopes {sorted(bad)}; use {','.join(SCOPES)}")
        try:
            raw = bytes.fromhex(digest)
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise ValueError(f"{source}:{n}: the third field must be the key's SHA-256 in hex (64 characters); "
                             "`lawchat keys new NAME` prints a line to paste")
        keys.append(ApiKey(name, frozenset(scopes.split(",")), raw))
    return keys


class KeyStore:
    def __init__(self, config: AuthConfig):
        keys = []
        if config.keys_file:
            path = Path(config.keys_file)
            if not path.is_file():
                raise ValueError(f"auth.keys_file: no such file: {path}")
            keys += parse_keys(path.read_text(encoding="utf-8"), str(path))
        if config.keys_env and os.environ.get(config.keys_env):
            keys += parse_keys(os.environ[config.keys_env], f"${config.keys_env}")
        if config.enabled and not keys:
            raise ValueError(f"auth.enabled is true but no keys were found (auth.keys_file, ${config.keys_env})")
        if config.enabled is False and keys:
            raise ValueError(f"auth.enabled is false but API keys are configured (auth.keys_file, "
                             f"${config.keys_env}): keys always turn auth on; remove them, or the false")
        self.enabled = bool(keys)
        self.keys = keys

    def lookup(self, presented: str | None) -> ApiKey | None:
        """The key's entry, comparing the hash with every stored one (no early exit)."""
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        found = None
        for k in self.keys:
            if hmac.compare_digest(digest, k.sha256):
                found = k
        return found


def authorize(store: KeyStore, presented: str | None, scope: str) -> tuple[grpc.StatusCode | None, str]:
    """(None, key name) when `presented` may use `scope`, else the refusal's code and message. One decision for
    every protocol (the gRPC interceptor, the OpenAI-compatible HTTP API)."""
    if not store.enabled:
        return None, ""
    key = store.lookup(presented)
    if key is None:
        return grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key: send it as metadata x-api-key"
    if scope not in key.scopes:
        return grpc.StatusCode.PERMISSION_DENIED, f"key {key.name!r} lacks the {scope!r} scope"
    return None, key.name


def metadata_value(metadata, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key:
            return v if isinstance(v, str) else None
    return None


def _denied(handler, code: grpc.StatusCode, message: str):
    """A handler of the same kind as `handler` that only ends the RPC with `code`."""
    async def unary(request, context):
        await context.abort(code, message)

    async def streaming(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover  (makes this an async generator)

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, store: KeyStore):
        self.store = store

    async def intercept_service(self, continuation, details):
        service = details.method.rsplit("/", 2)[-2] if details.method.count("/") >= 2 else ""
        scope = SERVICE_SCOPES.get(service)
        if scope is None or not self.store.enabled:
            return await continuation(details)
        code, message = authorize(self.store, metadata_value(details.invocation_metadata, "x-api-key"), scope)
        handler = await continuation(details)
        if code is None or handler is None:
            return handler
        return _denied(handler, code, message)


def client_id(context, store: KeyStore, trusted_proxies: list = ()) -> str:
    """Who the rate limiter charges: the API key's name, else the client's address (the peer's, or behind a
    trusted proxy the one it forwarded)."""
    metadata = context.invocation_metadata()
    if store.enabled:
        key = store.lookup(metadata_value(metadata, "x-api-key"))
        if key is not None:
            return "key:" + key.name
    return "peer:" + client_address(context.peer() or "unknown", metadata_value(metadata, "x-forwarded-for"),
                                    trusted_proxies)


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    read = lambda p: Path(p).read_bytes()   # noqa: E731
    ca = read(tls.client_ca_file) if tls.client_ca_file else None
    return grpc.ssl_server_credentials([(read(tls.key_file), read(tls.cert_file))], root_certificates=ca,
                                       require_client_auth=ca is not None)
