"""openai_api: the OpenAI chat-completions API over HTTP, beside gRPC (`http:` in configs/server.yaml).

`POST /v1/chat/completions` (JSON, or SSE with `stream: true`), `GET /v1/models`, `GET /health`. Each request
is turned into a lawchat.v1 ChatRequest and runs through `ChatService.generate` — the one request path behind
every protocol: the same auth decision and scopes (`Authorization: Bearer KEY`), size limits, rate limits (429
with `Retry-After`), breaker and canned answers (marked `lawchat.degraded`), retrieval and its citations
(`lawchat.citations`), drain, metrics (method label `ChatCompletions`) and request ids (`x-request-id`).
Fields OpenAI defines that lawchat cannot honour (tools, logprobs, n > 1, ...) and unknown fields are refused
with an OpenAI-style 400, never ignored. Extensions: `top_k`, `retrieval: {enabled, top_k}`.

Starlette on uvicorn: both BSD-licensed, small, maintained by the encode team that also keeps httpx (which the
official openai SDK runs on); Starlette's StreamingResponse does SSE and cancels the generator when the client
goes, which ends the engine sequence. Uvicorn runs on the server's own asyncio loop, beside grpc.aio.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from lawchat.v1 import chat_pb2

from .auth import authorize
from .engine.engine import EOS, MAX_TOKENS, STOP_SEQUENCE

log = logging.getLogger("lawchat.http")

METHOD = "ChatCompletions"
FINISH = {EOS: "stop", STOP_SEQUENCE: "stop", MAX_TOKENS: "length", "degraded": "stop"}
HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
               grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403,
               grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
               grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}
# OpenAI request fields lawchat honours, and those it knows but cannot honour (refused by name)
FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n",
          "stream", "stream_options", "user", "top_k", "retrieval"}
UNSUPPORTED = {"tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs", "logit_bias",
               "response_format", "presence_penalty", "frequency_penalty", "audio", "modalities", "prediction",
               "parallel_tool_calls", "reasoning_effort", "web_search_options", "service_tier", "store", "metadata"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class HttpConfig:
    host: str = "127.0.0.1"           # OpenAI-compatible HTTP API listen address
    port: int | None = None           # null = off; 0 = a free port (logged)
    served_model_name: str | None = None   # the `model` clients send; null = the model dir's name

    def validate(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ValueError("http.port must be in [0, 65535] or null")


class HttpError(Exception):
    """Ends the HTTP request with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": ERROR_TYPE.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def http_error_of(code: grpc.StatusCode, message: str, trailing: dict) -> HttpError:
    headers = {}
    if trailing.get("x-request-id"):
        headers["x-request-id"] = trailing["x-request-id"]
    if trailing.get("retry-after-ms"):
        ms = int(trailing["retry-after-ms"])
        headers.update({"retry-after-ms": str(ms), "retry-after": str(max(1, math.ceil(ms / 1000)))})
    return HttpError(HTTP_STATUS.get(code, 500), message, code=code.name.lower(), headers=headers)


class HttpContext:
    """What the request path reads of a gRPC context, from an HTTP request: metadata (the bearer key as
    x-api-key), the peer, the response headers, abort."""

    def __init__(self, request, api_key: str | None):
        h = request.headers
        md = [("x-api-key", api_key)] if api_key else []
        for name in ("x-request-id", "x-forwarded-for", "x-envoy-attempt-count"):
            if name in h:
                md.append((name, h[name]))
        self._md = tuple(md)
        host, port = (request.client.host, request.client.port) if request.client else ("unknown", 0)
        self._peer = f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
        self.request_id: str | None = None

    def invocation_metadata(self):
        return self._md

    def peer(self) -> str:
        return self._peer

    async def send_initial_metadata(self, metadata) -> None:
        self.request_id = dict(metadata).get("x-request-id")

    async def abort(self, code, message, trailing_metadata=()):
        raise http_error_of(code, message, dict(trailing_metadata))

    def time_remaining(self):
        return None


def _typed(body: dict, name: str, types, what: str):
    """body[name] if it is None or of `types` (a JSON true/false is no number), else a 400 naming it."""
    v = body.get(name)
    allowed = types if isinstance(types, tuple) else (types,)
    if v is not None and (not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed)):
        raise HttpError(400, f"'{name}' must be {what}, got {json.dumps(v, ensure_ascii=False)[:60]}", name)
    return v


def _content(i: int, m: dict) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) for p in c):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in c):
            raise HttpError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
        return "".join(p["text"] for p in c)
    if c is None and m.get("role") == "assistant":
        return ""
    raise HttpError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def to_chat_request(body) -> tuple[chat_pb2.ChatRequest, bool, bool]:
    """An OpenAI request body -> (the ChatRequest, stream, include_usage); HttpError 400 for what cannot map."""
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    for name in body:
        if name in UNSUPPORTED:
            raise HttpError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
        if name not in FIELDS:
            raise HttpError(400, f"unknown parameter '{name}'", name, "unknown_parameter")
    if not isinstance(body.get("model"), str):
        raise HttpError(400, "'model' is required (a string; GET /v1/models lists it)", "model")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise HttpError(400, "'messages' must be a list of {role, content} objects", "messages")
    req = chat_pb2.ChatRequest()
    for i, m in enumerate(msgs):
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise HttpError(400, f"messages[{i}]: unsupported fields {sorted(extra)}", f"messages[{i}]")
        role = ROLES.get(m.get("role"))
        if role is None:
            raise HttpError(400, f"messages[{i}].role must be one of {sorted(ROLES)}, got {m.get('role')!r}",
                            f"messages[{i}].role")
        req.messages.add(role=role, content=_content(i, m))
    if _typed(body, "n", int, "1") not in (None, 1):
        raise HttpError(400, "only n=1 is supported", "n")
    stream = bool(_typed(body, "stream", bool, "a boolean"))
    opts = _typed(body, "stream_options", dict, "an object")
    include_usage = False
    if opts is not None:
        if not stream:
            raise HttpError(400, "'stream_options' is only allowed with stream: true", "stream_options")
        if set(opts) - {"include_usage"}:
            raise HttpError(400, f"stream_options: unsupported fields {sorted(set(opts) - {'include_usage'})}",
                            "stream_options")
        include_usage = bool(_typed(opts, "include_usage", bool, "a boolean"))
    _typed(body, "user", str, "a string")
    for name in ("temperature", "top_p"):
        v = _typed(body, name, (int, float), "a number")
        if v is not None:
            setattr(req.sampling, name, float(v))
    top_k = _typed(body, "top_k", int, "an integer")
    if top_k is not None:
        if not 0 <= top_k < 2**32:
            raise HttpError(400, f"'top_k' must be in [0, 2**32), got {top_k}", "top_k")
        req.sampling.top_k = top_k
    seed = _typed(body, "seed", int, "an integer")
    if seed is not None:
        if not 0 <= seed < 2**64:
            raise HttpError(400, f"'seed' must be in [0, 2**64-1], got {seed}", "seed")
        req.sampling.seed = seed
    limits = [(n, _typed(body, n, int, "an integer")) for n in ("max_completion_tokens", "max_tokens")]
    for name, v in limits:
        if v is not None:
            if not 1 <= v < 2**32:
                raise HttpError(400, f"'{name}' must be >= 1, got {v}", name)
            req.stopping.max_new_tokens = v
            break
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise HttpError(400, "'stop' must be a string or a list of strings", "stop")
        req.stopping.stop_sequences.extend(stops)
    r = _typed(body, "retrieval", dict, "an object {enabled, top_k}")
    if r is not None:
        if set(r) - {"enabled", "top_k"}:
            raise HttpError(400, "retrieval takes only enabled and top_k", "retrieval")
        if _typed(r, "enabled", bool, "a boolean") is not None:
            req.retrieval.enabled = r["enabled"]
        if _typed(r, "top_k", int, "an integer") is not None:
            if not 0 <= r["top_k"] < 2**32:
                raise HttpError(400, "retrieval.top_k must be >= 0", "retrieval")
            req.retrieval.top_k = r["top_k"]
    return req, stream, include_usage


def grounding_dict(grounding) -> dict:
    """`lawchat.citations` and `lawchat.no_governing_article` of an answer (chat_service.Grounding)."""
    return {"citations": citation_dicts(grounding.hits), "no_governing_article": grounding.no_article}


def citation_dicts(hits) -> list[dict]:
    from .chat_service import SNIPPET_CHARS
    return [{"law": h.law, "article": h.article, "snippet": h.text[:SNIPPET_CHARS], "score": h.score,
             "confidence": h.confidence} for h in hits]


def build_http_app(chat, keys, slot, cfg: HttpConfig, max_body_bytes: int, unready):
    """The Starlette app. `chat`: the ChatService whose request path every completion takes; `unready()`: why
    this replica should get no traffic ('' = ready)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def adapter_names() -> list[str]:
        engine = slot.engine
        return [a["name"] for a in engine.stats().adapters] if engine is not None else []

    def model_name() -> str:
        return cfg.served_model_name or (slot.model_path.name if slot.model_path else "lawchat")

    def error_response(e: HttpError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def check_key(request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key")
        code, message = authorize(keys, key, "chat")
        if code is not None:
            raise HttpError(HTTP_STATUS[code], message.replace("send it as metadata x-api-key",
                                                               "send it as Authorization: Bearer KEY"),
                            code="invalid_api_key" if code == grpc.StatusCode.UNAUTHENTICATED else None)
        return key

    async def completions(request: Request):
        t0 = time.time()
        try:
            key = check_key(request)
            raw = await read_body(request, max_body_bytes)
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as e:
                raise HttpError(400, f"the body is not JSON: {type(e).__name__}") from None
            req, stream, include_usage = to_chat_request(body)
            if body["model"] in adapter_names():        # a LoRA adapter over the model (vLLM's convention)
                req.adapter = body["model"]
            elif body["model"] not in (model_name(), str(slot.model_path)):
                raise HttpError(404, f"the model {body['model']!r} does not exist here; this server serves "
                                f"{', '.join([model_name(), *adapter_names()])}", "model", "model_not_found")
            ctx = HttpContext(request, key)
            parts = chat.generate(METHOD, req, ctx)
            first = await anext(parts)             # errors before the first chunk get their HTTP status
        except HttpError as e:
            return error_response(e)
        rid = ctx.request_id or ""
        base = {"id": f"chatcmpl-{rid}", "created": int(t0), "model": req.adapter or model_name()}
        headers = {"x-request-id": rid}
        if not stream:
            deltas, (chunk, degraded, grounding) = [first[0].delta], first
            try:
                async for chunk, degraded, grounding in parts:
                    deltas.append(chunk.delta)
            except HttpError as e:
                return error_response(e)
            return JSONResponse({**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "".join(deltas)}, "logprobs": None,
                 "finish_reason": FINISH[chunk.finish_reason]}], "usage": usage(chunk),
                "lawchat": {"degraded": degraded, **grounding_dict(grounding)}}, headers=headers)
        return StreamingResponse(sse(base, first, parts, include_usage), media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"})

    async def sse(base: dict, first, parts, include_usage: bool) -> AsyncIterator[str]:
        def event(choice: dict | None, **extra) -> str:
            msg = {**base, "object": "chat.completion.chunk", "choices": [choice] if choice else [], **extra}
            if include_usage and "usage" not in msg:
                msg["usage"] = None
            return f"data: {json.dumps(msg, ensure_ascii=False)}\n\n"
        yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None})
        item = first
        try:
            while True:
                chunk, degraded, grounding = item
                if chunk.finish_reason is None:
                    yield event({"index": 0, "delta": {"content": chunk.delta}, "logprobs": None,
                                 "finish_reason": None})
                else:
                    yield event({"index": 0, "delta": {"content": chunk.delta} if chunk.delta else {},
                                 "logprobs": None, "finish_reason": FINISH[chunk.finish_reason]},
                                lawchat={"degraded": degraded, **grounding_dict(grounding)})
                    if include_usage:
                        yield event(None, usage=usage(chunk))
                    async for _ in parts:           # to its natural end: the request path records OK
                        pass
                    break
                item = await anext(parts)
        except HttpError as e:                      # after the first chunk: the status line has gone out
            yield f"data: {json.dumps(e.body(), ensure_ascii=False)}\n\n"
        finally:                                    # the request path's own ending (metrics, logs) runs now,
            await parts.aclose()                    # also when the client went away mid-stream
        yield "data: [DONE]\n\n"

    async def models(request: Request):
        try:
            check_key(request)
        except HttpError as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": [
            {"id": model_name(), "object": "model", "created": 0, "owned_by": "lawchat"},
            *({"id": name, "object": "model", "created": 0, "owned_by": "lawchat", "parent": model_name()}
              for name in adapter_names())]})

    async def health(request: Request):
        why = unready()
        return JSONResponse({"status": why or "ok"}, status_code=503 if why else 200)

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"]),
                             Route("/health", health, methods=["GET"])])


async def read_body(request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes `limit` bytes: a huge upload is never held whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HttpError(413, f"the request has {declared} bytes; this server takes at most {limit}")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise HttpError(413, f"the request has more than {limit} bytes; this server takes at most {limit}")
        parts.append(part)
    return b"".join(parts)


def usage(chunk) -> dict:
    return {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens,
            "total_tokens": chunk.prompt_tokens + chunk.completion_tokens}


def bind(host: str, port: int) -> socket.socket:
    """The HTTP port, taken now (a clash fails at start, like the gRPC port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} (http): {e}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class HttpServer:
    """Uvicorn on the running asyncio loop, on a socket bound beforehand; signals stay with the app."""

    def __init__(self, asgi_app, sock: socket.socket):
        import uvicorn

        class _Server(uvicorn.Server):
            def capture_signals(self):         # SIGTERM/SIGINT are the app's to handle (drain, then stop)
                return contextlib.nullcontext()
        self.sock = sock
        self.port = sock.getsockname()[1]
        self._server = _Server(uvicorn.Config(asgi_app, log_level="warning", access_log=False, lifespan="off",
                                              timeout_graceful_shutdown=1))
        self._task = None

    def start(self) -> None:
        import asyncio
        self._task = asyncio.ensure_future(self._server.serve(sockets=[self.sock]))

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        self.sock.close()
