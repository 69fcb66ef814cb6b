"""chat_service: lawchat.v1.ChatService — Chat (unary) and ChatStream (server streaming).

Every RPC ends with a status: OK with a final message carrying finish reason and usage, or an error
code with a message. Prompt and answer text are never logged.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from lawchat.v1 import chat_pb2, chat_pb2_grpc

from .engine.engine import EOS, MAX_TOKENS, STOP_SEQUENCE, Chunk, EngineClosed, EngineOverloaded, GenerationRequest
from .metrics import Metrics
from .prompt import PromptError
from .params import GenerationDefaults, InvalidRequest, parse_messages, parse_sampling, parse_stopping

log = logging.getLogger("lawchat.rpc")

FINISH_REASONS = {
    EOS: chat_pb2.FINISH_REASON_EOS_TOKEN,
    MAX_TOKENS: chat_pb2.FINISH_REASON_MAX_TOKENS,
    STOP_SEQUENCE: chat_pb2.FINISH_REASON_STOP_SEQUENCE,
}
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
RETRY_AFTER_MS = "1000"
DEADLINE_SLACK_S = 0.1


def request_id_of(context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and REQUEST_ID_RE.match(value):
            return value
    return uuid.uuid4().hex


def usage_of(chunk: Chunk) -> chat_pb2.Usage:
    return chat_pb2.Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens)


class ChatService(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, engine, defaults: GenerationDefaults, metrics: Metrics):
        self.engine = engine
        self.defaults = defaults
        self.metrics = metrics

    async def ChatStream(self, request, context) -> AsyncIterator[chat_pb2.ChatStreamResponse]:
        async for chunk in self._generate("ChatStream", request, context):
            if chunk.finish_reason is None:
                yield chat_pb2.ChatStreamResponse(delta=chunk.delta)
            else:
                yield chat_pb2.ChatStreamResponse(delta=chunk.delta, finish_reason=FINISH_REASONS[chunk.finish_reason],
                                                  usage=usage_of(chunk))

    async def Chat(self, request, context) -> chat_pb2.ChatResponse:
        parts, last = [], None
        async for chunk in self._generate("Chat", request, context):
            parts.append(chunk.delta)
            last = chunk
        return chat_pb2.ChatResponse(text="".join(parts), finish_reason=FINISH_REASONS[last.finish_reason],
                                     usage=usage_of(last))

    def _build_request(self, request) -> GenerationRequest:
        messages = parse_messages(request)
        sampling = parse_sampling(request, self.defaults)
        max_new, stops = parse_stopping(request, self.defaults)
        try:
            prompt_ids = self.engine.encode_chat(messages)
        except PromptError as e:
            raise InvalidRequest(str(e)) from None
        room = self.engine.max_len - len(prompt_ids)
        if room < 1:
            raise InvalidRequest(f"the prompt has {len(prompt_ids)} tokens; this model takes at most "
                                 f"{self.engine.max_len - 1}")
        return GenerationRequest(prompt_ids, sampling, min(max_new, room), stops,
                                 ignore_eos=request.stopping.ignore_eos)

    async def _generate(self, method: str, request, context) -> AsyncIterator[Chunk]:
        rid = request_id_of(context)
        await context.send_initial_metadata((("x-request-id", rid),))
        m = self.metrics
        t0 = time.perf_counter()
        t_last = ttft = None
        code, last = "OK", None
        try:
            try:
                gen_request = await asyncio.to_thread(self._build_request, request)   # tokenising is CPU work
                async for chunk in self.engine.stream(gen_request):
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - t0
                        m.ttft.observe(ttft)
                    else:
                        m.itl.observe(now - t_last)
                    t_last, last = now, chunk
                    yield chunk
            except InvalidRequest as e:
                code = "INVALID_ARGUMENT"
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except EngineOverloaded as e:
                code = "RESOURCE_EXHAUSTED"
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded ({e}); retry later",
                                    trailing_metadata=(("retry-after-ms", RETRY_AFTER_MS),))
            except EngineClosed as e:
                code = "UNAVAILABLE"
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            except Exception:
                code = "INTERNAL"
                log.exception("request_id=%s generation failed", rid)
                await context.abort(grpc.StatusCode.INTERNAL, f"generation failed (request id {rid})")
        except asyncio.CancelledError:
            remaining = context.time_remaining()   # the client's own deadline cancel can beat the server's timer
            code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= DEADLINE_SLACK_S else "CANCELLED"
            raise
        finally:
            e2e = time.perf_counter() - t0
            m.requests.labels(method, code).inc()
            if last is not None:
                m.prompt_tokens.inc(last.prompt_tokens)
                m.generation_tokens.inc(last.completion_tokens)
                if last.finish_reason is not None:
                    m.finished.labels(last.finish_reason).inc()
                    m.e2e.observe(e2e)
            log.info("rpc=%s request_id=%s code=%s prompt_tokens=%s completion_tokens=%s finish=%s ttft_ms=%s e2e_ms=%.1f",
                     method, rid, code, last.prompt_tokens if last else "-", last.completion_tokens if last else "-",
                     last.finish_reason if last else "-", f"{ttft * 1e3:.1f}" if ttft is not None else "-", e2e * 1e3)
