"""client: the synchronous SDK over the lawchat.v1 gRPC API (grpcio + protobuf only). aio.py is its asyncio twin.

    client = LawchatClient("127.0.0.1:50051")                  # or ["10.0.0.5:50051", "10.0.0.6:50051"], "dns:///lawchat:50051"
    for delta in client.chat_stream("公司拖欠工资怎么办？"):
        print(delta, end="")
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Unpack

import grpc
from google.protobuf import json_format
from lawchat.v1 import admin_pb2, admin_pb2_grpc, chat_pb2, chat_pb2_grpc

from .channel import Targets, make_channel
from .messages import ChatOptions, ChatResult, Messages, StreamState, build_request, metadata, result_of
from .retry import Deadline, LawchatError, RetryPolicy, error_from_rpc  # noqa: F401  (LawchatError: 0.1 imported it here)

API_KEY_ENV = "LAWCHAT_API_KEY"


def to_dict(msg, **kw) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True, **kw)


class ChatStream:
    """Iterate for text deltas; afterwards finish_reason, prompt_tokens, completion_tokens, degraded, citations.

    A failure before any text arrived is retried under the client's RetryPolicy; after text, it is raised."""

    def __init__(self, start: Callable[[float | None], object], policy: RetryPolicy, deadline: Deadline):
        self._start, self._policy, self._deadline = start, policy, deadline
        self._call = start(deadline.remaining())
        self._state = StreamState()
        self.attempts = 1

    def __getattr__(self, name):            # finish_reason, prompt_tokens, completion_tokens, degraded, citations
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._state, name)

    @property
    def request_id(self) -> str | None:
        return dict(self._call.initial_metadata() or ()).get("x-request-id")

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                for msg in self._call:
                    delta = self._state.read(msg)
                    if delta:
                        yield delta
                return
            except grpc.RpcError as e:
                err = error_from_rpc(e, self.attempts)
                wait = self._policy.next_wait(err, self.attempts, self._deadline, self._state.yielded_text)
                if wait is None:
                    raise err from None
                time.sleep(wait)
                self.attempts += 1
                self._call = self._start(self._deadline.remaining())

    def cancel(self) -> None:
        """Stop generation on the server (it frees the slot at once)."""
        self._call.cancel()


class LawchatClient:
    """A client of one or several lawchat servers.

    targets: "host:port", a list of them (round_robin over the healthy ones), or "dns:///name:port".
    timeout: default deadline of a call in seconds, retries included. retry: RetryPolicy(max_attempts=1) for none.
    api_key defaults to $LAWCHAT_API_KEY; tls_ca (and tls_cert + tls_key for mTLS) switch the channel to TLS."""

    def __init__(self, targets: Targets = "127.0.0.1:50051", *, timeout: float | None = None,
                 api_key: str | None = None, retry: RetryPolicy | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, tls: bool = False,
                 server_name: str | None = None, channel: grpc.Channel | None = None):
        self._channel = channel or make_channel(targets, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, tls=tls,
                                                server_name=server_name)
        self._chat = chat_pb2_grpc.ChatServiceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LawchatClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _unary(self, method, request, timeout: float | None, request_id: str | None = None, retry: bool = True):
        """-> (response, call); retried under the policy when `retry`."""
        deadline = Deadline(timeout if timeout is not None else self.timeout)
        policy = self.retry if retry else RetryPolicy(max_attempts=1)
        attempt = 1
        while True:
            try:
                return method.with_call(request, timeout=deadline.remaining(),
                                        metadata=metadata(self.api_key, request_id))
            except grpc.RpcError as e:
                err = error_from_rpc(e, attempt)
                wait = policy.next_wait(err, attempt, deadline)
                if wait is None:
                    raise err from None
                time.sleep(wait)
                attempt += 1

    def chat_stream(self, messages: Messages, **options: Unpack[ChatOptions]) -> ChatStream:
        """Stream an answer: iterate the result for text deltas. retrieval=True adds statute articles to the
        prompt; they come back in `stream.citations` after the last delta."""
        req = build_request(chat_pb2.ChatStreamRequest, messages, options)
        md = metadata(self.api_key, options.get("request_id"))
        timeout = options.get("timeout", self.timeout)
        return ChatStream(lambda remaining: self._chat.ChatStream(req, timeout=remaining, metadata=md), self.retry,
                          Deadline(timeout))

    def chat(self, messages: Messages, **options: Unpack[ChatOptions]) -> ChatResult:
        """The whole answer in one response (the unary Chat RPC)."""
        req = build_request(chat_pb2.ChatRequest, messages, options)
        resp, call = self._unary(self._chat.Chat, req, options.get("timeout"), options.get("request_id"))
        return result_of(resp, dict(call.initial_metadata() or ()).get("x-request-id"))

    # -- AdminService (a key with the admin scope when the server has auth on) --------------------------
    def status(self, timeout: float | None = None) -> dict:
        """GetStatus as a dict (nested messages as dicts, enums by name)."""
        resp, _ = self._unary(self._admin.GetStatus, admin_pb2.GetStatusRequest(), timeout)
        return to_dict(resp, always_print_fields_with_no_presence=True, unquote_int64_if_possible=True)

    def set_degraded(self, enabled: bool, reason: str = "", timeout: float | None = None) -> dict:
        resp, _ = self._unary(self._admin.SetDegraded, admin_pb2.SetDegradedRequest(enabled=enabled, reason=reason),
                              timeout)
        return to_dict(resp.degraded, always_print_fields_with_no_presence=True)

    def update_limits(self, timeout: float | None = None, **limits: dict) -> dict:
        """update_limits(client_requests={"rate": 5, "burst": 10}); keys left out keep their value."""
        msg = admin_pb2.Limits(**{name: admin_pb2.RateLimit(**value) for name, value in limits.items()})
        resp, _ = self._unary(self._admin.UpdateLimits, admin_pb2.UpdateLimitsRequest(limits=msg), timeout)
        return to_dict(resp.limits)

    def reload_model(self, model_path: str, timeout: float | None = None) -> dict:
        resp, _ = self._unary(self._admin.ReloadModel, admin_pb2.ReloadModelRequest(model_path=model_path), timeout,
                              retry=False)
        return to_dict(resp)

    def add_documents(self, documents: list[dict], timeout: float | None = None) -> dict:
        """AddDocuments: [{"id", "law", "article", "text"}, ...] -> {added, replaced, knowledge}; searchable by the
        next request. All or nothing: one invalid document raises INVALID_ARGUMENT naming each bad one."""
        req = admin_pb2.AddDocumentsRequest(documents=[admin_pb2.KnowledgeDocument(**d) for d in documents])
        resp, _ = self._unary(self._admin.AddDocuments, req, timeout, retry=False)
        return to_dict(resp, always_print_fields_with_no_presence=True, unquote_int64_if_possible=True)

    def delete_documents(self, ids: list[str], timeout: float | None = None) -> dict:
        """DeleteDocuments by id -> {deleted, not_found, knowledge}."""
        resp, _ = self._unary(self._admin.DeleteDocuments, admin_pb2.DeleteDocumentsRequest(ids=ids), timeout,
                              retry=False)
        return to_dict(resp, always_print_fields_with_no_presence=True, unquote_int64_if_possible=True)

    def load_adapter(self, name: str, path: str, timeout: float | None = None) -> dict:
        """LoadAdapter: serve the PEFT adapter dir `path` (on the server's disk) as `name` from the next request
        -> {adapter, load_seconds}. FAILED_PRECONDITION says why one that does not fit the model is refused."""
        resp, _ = self._unary(self._admin.LoadAdapter, admin_pb2.LoadAdapterRequest(name=name, path=path), timeout,
                              retry=False)
        return to_dict(resp, always_print_fields_with_no_presence=True, unquote_int64_if_possible=True)

    def unload_adapter(self, name: str, timeout: float | None = None) -> dict:
        resp, _ = self._unary(self._admin.UnloadAdapter, admin_pb2.UnloadAdapterRequest(name=name), timeout,
                              retry=False)
        return to_dict(resp, always_print_fields_with_no_presence=True)

    def list_adapters(self, timeout: float | None = None) -> list[dict]:
        """ListAdapters -> [{name, path, rank, target_modules, on_device, requests, running}, ...]."""
        resp, _ = self._unary(self._admin.ListAdapters, admin_pb2.ListAdaptersRequest(), timeout)
        return to_dict(resp, always_print_fields_with_no_presence=True, unquote_int64_if_possible=True)["adapters"]

    def drain(self, timeout_seconds: float = 0.0, timeout: float | None = None) -> dict:
        resp, _ = self._unary(self._admin.Drain, admin_pb2.DrainRequest(timeout_seconds=timeout_seconds), timeout,
                              retry=False)
        return to_dict(resp, always_print_fields_with_no_presence=True)
