"""aio: AsyncLawchatClient, the asyncio twin of LawchatClient (grpc.aio), with the same methods and options.

    async with AsyncLawchatClient("127.0.0.1:50051") as client:
        stream = client.chat_stream("公司拖欠工资怎么办？")
        async for delta in stream:
            print(delta, end="")
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from typing import Unpack

import grpc
from lawchat.v1 import admin_pb2, admin_pb2_grpc, chat_pb2, chat_pb2_grpc

from .channel import Targets, make_channel
from .client import API_KEY_ENV, to_dict
from .messages import ChatOptions, ChatResult, Messages, StreamState, build_request, metadata, result_of
from .retry import Deadline, RetryPolicy, error_from_rpc


class AsyncChatStream:
    """`async for delta in stream`; afterwards the same fields as ChatStream. Retried before text only."""

    def __init__(self, start: Callable[[float | None], object], policy: RetryPolicy, deadline: Deadline):
        self._start, self._policy, self._deadline = start, policy, deadline
        self._call = start(deadline.remaining())
        self._state = StreamState()
        self.attempts = 1

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._state, name)

    async def request_id(self) -> str | None:
        return dict(await self._call.initial_metadata() or ()).get("x-request-id")

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            try:
                async for msg in self._call:
                    delta = self._state.read(msg)
                    if delta:
                        yield delta
                return
            except grpc.aio.AioRpcError as e:
                err = error_from_rpc(e, self.attempts)
                wait = self._policy.next_wait(err, self.attempts, self._deadline, self._state.yielded_text)
                if wait is None:
                    raise err from None
                await asyncio.sleep(wait)
                self.attempts += 1
                self._call = self._start(self._deadline.remaining())

    def cancel(self) -> None:
        self._call.cancel()


class AsyncLawchatClient:
    """The same constructor and methods as LawchatClient; calls are coroutines, chat_stream an async iterable."""

    def __init__(self, targets: Targets = "127.0.0.1:50051", *, timeout: float | None = None,
                 api_key: str | None = None, retry: RetryPolicy | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, tls: bool = False,
                 server_name: str | None = None, channel: grpc.aio.Channel | None = None):
        self._channel = channel or make_channel(targets, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, tls=tls,
                                                server_name=server_name, aio=True)
        self._chat = chat_pb2_grpc.ChatServiceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncLawchatClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _unary(self, method, request, timeout: float | None, request_id: str | None = None, retry: bool = True):
        deadline = Deadline(timeout if timeout is not None else self.timeout)
        policy = self.retry if retry else RetryPolicy(max_attempts=1)
        attempt = 1
        while True:
            call = method(request, timeout=deadline.remaining(), metadata=metadata(self.api_key, request_id))
            try:
                return await call, call
            except grpc.aio.AioRpcError as e:
                err = error_from_rpc(e, attempt)
                wait = policy.next_wait(err, attempt, deadline)
                if wait is None:
                    raise err from None
                await asyncio.sleep(wait)
                attempt += 1

    def chat_stream(self, messages: Messages, **options: Unpack[ChatOptions]) -> AsyncChatStream:
        req = build_request(chat_pb2.ChatStreamRequest, messages, options)
        md = metadata(self.api_key, options.get("request_id"))
        timeout = options.get("timeout", self.timeout)
        return AsyncChatStream(lambda remaining: self._chat.ChatStream(req, timeout=remaining, metadata=md),
                               self.retry, Deadline(timeout))

    async def chat(self, messages: Messages, **options: Unpack[ChatOptions]) -> ChatResult:
        req = build_request(chat_pb2.ChatRequest, messages, options)
        resp, call = await self._unary(self._chat.Chat, req, options.get("timeout"), options.get("request_id"))
        return result_of(resp, dict(await call.initial_metadata() or ()).get("x-request-id"))

    async def status(self, timeout: float | None = None) -> dict:
        resp, _ = await self._unary(self._admin.GetStatus, admin_pb2.GetStatusRequest(), timeout)
        return to_dict(resp, always_print_fields_with_no_presence=True, unquote_int64_if_possible=True)

    async def set_degraded(self, enabled: bool, reason: str = "", timeout: float | None = None) -> dict:
        resp, _ = await self._unary(self._admin.SetDegraded,
                                    admin_pb2.SetDegradedRequest(enabled=enabled, reason=reason), timeout)
        return to_dict(resp.degraded, always_print_fields_with_no_presence=True)

    async def update_limits(self, timeout: float | None = None, **limits: dict) -> dict:
        msg = admin_pb2.Limits(**{name: admin_pb2.RateLimit(**value) for name, value in limits.items()})
        resp, _ = await self._unary(self._admin.UpdateLimits, admin_pb2.UpdateLimitsRequest(limits=msg), timeout)
        return to_dict(resp.limits)

    async def reload_model(self, model_path: str, timeout: float | None = None) -> dict:
        resp, _ = await self._unary(self._admin.ReloadModel, admin_pb2.ReloadModelRequest(model_path=model_path),
                                    timeout, retry=False)
        return to_dict(resp)

    async def drain(self, timeout_seconds: float = 0.0, timeout: float | None = None) -> dict:
        resp, _ = await self._unary(self._admin.Drain, admin_pb2.DrainRequest(timeout_seconds=timeout_seconds),
                                    timeout, retry=False)
        return to_dict(resp, always_print_fields_with_no_presence=True)
