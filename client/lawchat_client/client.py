"""client: a small synchronous SDK over the lawchat.v1 gRPC API (grpcio + protobuf only)."""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import json_format
from lawchat.v1 import admin_pb2, admin_pb2_grpc, chat_pb2, chat_pb2_grpc

FINISH_REASONS = {
    chat_pb2.FINISH_REASON_EOS_TOKEN: "eos",
    chat_pb2.FINISH_REASON_MAX_TOKENS: "max_tokens",
    chat_pb2.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
    chat_pb2.FINISH_REASON_DEGRADED: "degraded",
}
API_KEY_ENV = "LAWCHAT_API_KEY"

Messages = str | Sequence[dict] | Sequence[tuple[str, str]]


class LawchatError(Exception):
    """An RPC failed. `code` is the grpc.StatusCode; `retry_after` (seconds) is set on RESOURCE_EXHAUSTED."""

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str | None = None,
                 retry_after: float | None = None):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details, self.request_id, self.retry_after = code, details, request_id, retry_after


@dataclass
class ChatResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    request_id: str | None = None
    degraded: bool = False          # the server's canned answer (model unavailable or switched off)
    citations: list[dict] | None = None   # statute articles the answer rests on: {law, article, snippet, score}


def to_messages(messages: Messages) -> list[chat_pb2.Message]:
    """A plain string is one user question; else a list of {"role","content"} dicts or (role, content) pairs."""
    if isinstance(messages, str):
        return [chat_pb2.Message(role="user", content=messages)]
    out = []
    for m in messages:
        role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
        out.append(chat_pb2.Message(role=role, content=content))
    return out


def citations_of(citations) -> list[dict]:
    return [{"law": c.law, "article": c.article, "snippet": c.snippet, "score": c.score} for c in citations]


def _error(err: grpc.RpcError) -> LawchatError:
    trailing = dict(err.trailing_metadata() or ())
    initial = dict(err.initial_metadata() or ()) if hasattr(err, "initial_metadata") else {}
    retry = trailing.get("retry-after-ms")
    return LawchatError(err.code(), err.details() or "", initial.get("x-request-id"),
                        float(retry) / 1000 if retry else None)


class ChatStream:
    """Iterate for text deltas; afterwards `finish_reason`, `prompt_tokens`, `completion_tokens` are set."""

    def __init__(self, call):
        self._call = call
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.degraded = False            # True when the text is the server's canned answer
        self.citations: list[dict] = []  # {law, article, snippet, score}, set with the last message

    @property
    def request_id(self) -> str | None:
        return dict(self._call.initial_metadata() or ()).get("x-request-id")

    def __iter__(self) -> Iterator[str]:
        try:
            for msg in self._call:
                self.degraded = self.degraded or msg.degraded
                if msg.delta:
                    yield msg.delta
                if msg.finish_reason != chat_pb2.FINISH_REASON_UNSPECIFIED:
                    self.finish_reason = FINISH_REASONS.get(msg.finish_reason, "unknown")
                    self.prompt_tokens = msg.usage.prompt_tokens
                    self.completion_tokens = msg.usage.completion_tokens
                    self.citations = citations_of(msg.citations)
        except grpc.RpcError as e:
            raise _error(e) from None

    def cancel(self) -> None:
        """Stop generation on the server (it frees the slot at once)."""
        self._call.cancel()


def make_channel(target: str, *, tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 tls: bool = False, server_name: str | None = None) -> grpc.Channel:
    """A plaintext channel, or TLS when any tls option is given (`tls=True` alone trusts the system roots);
    tls_cert + tls_key present a client certificate (mTLS)."""
    if not (tls or tls_ca or tls_cert or tls_key):
        return grpc.insecure_channel(target)
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("give both tls_cert and tls_key for a client certificate, or neither")
    read = lambda p: Path(p).read_bytes() if p else None   # noqa: E731
    creds = grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target, creds, options=options)


class LawchatClient:
    """client = LawchatClient("127.0.0.1:50051"); for delta in client.chat_stream("问题"): print(delta, end="")

    api_key defaults to $LAWCHAT_API_KEY; tls_ca (and tls_cert + tls_key for mTLS) switch the channel to TLS."""

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = None,
                 api_key: str | None = None, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, tls: bool = False, server_name: str | None = None,
                 channel: grpc.Channel | None = None):
        self._channel = channel or make_channel(target, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, tls=tls,
                                                server_name=server_name)
        self._chat = chat_pb2_grpc.ChatServiceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        self.timeout = timeout
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LawchatClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _metadata(self, request_id: str | None) -> list[tuple[str, str]]:
        md = []
        if request_id:
            md.append(("x-request-id", request_id))
        if self.api_key:
            md.append(("x-api-key", self.api_key))
        return md

    @staticmethod
    def _request(message_type, messages: Messages, max_new_tokens, temperature, top_p, top_k, seed, stop,
                 ignore_eos=False, retrieval=None, retrieval_top_k=None):
        sampling = chat_pb2.SamplingParameters()
        if temperature is not None:
            sampling.temperature = temperature
        if top_p is not None:
            sampling.top_p = top_p
        if top_k is not None:
            sampling.top_k = top_k
        if seed is not None:
            sampling.seed = seed
        stopping = chat_pb2.StoppingCriteria(stop_sequences=list(stop or ()), ignore_eos=ignore_eos)
        if max_new_tokens is not None:
            stopping.max_new_tokens = max_new_tokens
        options = chat_pb2.RetrievalOptions()
        if retrieval is not None:
            options.enabled = retrieval
        if retrieval_top_k is not None:
            options.top_k = retrieval_top_k
        return message_type(messages=to_messages(messages), sampling=sampling, stopping=stopping, retrieval=options)

    def chat_stream(self, messages: Messages, *, max_new_tokens: int | None = None, temperature: float | None = None,
                    top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                    stop: Sequence[str] | None = None, request_id: str | None = None,
                    timeout: float | None = None, ignore_eos: bool = False, retrieval: bool | None = None,
                    retrieval_top_k: int | None = None) -> ChatStream:
        """retrieval=True: statute articles go into the prompt and come back in `stream.citations`."""
        req = self._request(chat_pb2.ChatStreamRequest, messages, max_new_tokens, temperature, top_p, top_k, seed, stop,
                            ignore_eos, retrieval, retrieval_top_k)
        call = self._chat.ChatStream(req, timeout=timeout or self.timeout, metadata=self._metadata(request_id))
        return ChatStream(call)

    def chat(self, messages: Messages, *, max_new_tokens: int | None = None, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
             stop: Sequence[str] | None = None, request_id: str | None = None,
             timeout: float | None = None, ignore_eos: bool = False, retrieval: bool | None = None,
             retrieval_top_k: int | None = None) -> ChatResult:
        req = self._request(chat_pb2.ChatRequest, messages, max_new_tokens, temperature, top_p, top_k, seed, stop,
                            ignore_eos, retrieval, retrieval_top_k)
        try:
            resp, call = self._chat.Chat.with_call(req, timeout=timeout or self.timeout,
                                                   metadata=self._metadata(request_id))
        except grpc.RpcError as e:
            raise _error(e) from None
        return ChatResult(resp.text, FINISH_REASONS.get(resp.finish_reason, "unknown"), resp.usage.prompt_tokens,
                          resp.usage.completion_tokens, dict(call.initial_metadata() or ()).get("x-request-id"),
                          resp.degraded, citations_of(resp.citations))

    # -- AdminService (needs a key with the admin scope when the server has auth on) -------------------
    def _admin_call(self, method: str, request, timeout: float | None):
        try:
            return getattr(self._admin, method)(request, timeout=timeout or self.timeout,
                                                metadata=self._metadata(None))
        except grpc.RpcError as e:
            raise _error(e) from None

    def status(self, timeout: float | None = None) -> dict:
        """GetStatus as a dict (nested messages as dicts, enums by name)."""
        resp = self._admin_call("GetStatus", admin_pb2.GetStatusRequest(), timeout)
        return json_format.MessageToDict(resp, preserving_proto_field_name=True, always_print_fields_with_no_presence=True,
                                         unquote_int64_if_possible=True)

    def set_degraded(self, enabled: bool, reason: str = "", timeout: float | None = None) -> dict:
        resp = self._admin_call("SetDegraded", admin_pb2.SetDegradedRequest(enabled=enabled, reason=reason), timeout)
        return json_format.MessageToDict(resp.degraded, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)

    def update_limits(self, timeout: float | None = None, **limits: dict) -> dict:
        """update_limits(client_requests={"rate": 5, "burst": 10}); keys left out keep their value."""
        msg = admin_pb2.Limits(**{name: admin_pb2.RateLimit(**value) for name, value in limits.items()})
        resp = self._admin_call("UpdateLimits", admin_pb2.UpdateLimitsRequest(limits=msg), timeout)
        return json_format.MessageToDict(resp.limits, preserving_proto_field_name=True)

    def reload_model(self, model_path: str, timeout: float | None = None) -> dict:
        resp = self._admin_call("ReloadModel", admin_pb2.ReloadModelRequest(model_path=model_path), timeout)
        return json_format.MessageToDict(resp, preserving_proto_field_name=True)

    def drain(self, timeout_seconds: float = 0.0, timeout: float | None = None) -> dict:
        resp = self._admin_call("Drain", admin_pb2.DrainRequest(timeout_seconds=timeout_seconds), timeout)
        return json_format.MessageToDict(resp, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
