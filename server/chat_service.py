"""chat_service: lawchat.v1.ChatService — Chat (unary) and ChatStream (server streaming).

Every RPC ends with a status: OK with a final message carrying finish reason and usage, or an error
code with a message. Prompt and answer text are never logged.
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from lawchat.v1 import chat_pb2, chat_pb2_grpc

from .auth import KeyStore, client_id
from .breaker import Breaker, EngineFailure
from .config import ServerConfig
from .degraded import canned_deltas, proxy_can_retry
from .engine.engine import (EOS, MAX_TOKENS, STOP_SEQUENCE, Chunk, EngineClosed, EngineOverloaded, EngineStalled,
                            GenerationRequest, InvalidGeneration, StepFailed, UnknownAdapter)
from .engine_slot import EngineSlot
from .limiter import Limiter
from .metrics import Metrics
from .prompt import PromptError, with_context, without_articles
from .params import InvalidRequest, parse_messages, parse_sampling, parse_stopping
from .retrieval import MAX_TOP_K, Hit, Retriever, RetrievalUnavailable, trusted

log = logging.getLogger("lawchat.rpc")

DEGRADED = "degraded"
FINISH_REASONS = {
    EOS: chat_pb2.FINISH_REASON_EOS_TOKEN,
    MAX_TOKENS: chat_pb2.FINISH_REASON_MAX_TOKENS,
    STOP_SEQUENCE: chat_pb2.FINISH_REASON_STOP_SEQUENCE,
    DEGRADED: chat_pb2.FINISH_REASON_DEGRADED,
}
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
QUEUE_RETRY_AFTER_MS = 1000     # the engine's wait queue is full: no bucket to compute from
DEADLINE_SLACK_S = 0.1
SNIPPET_CHARS = 300


class Refused(Exception):
    """Ends the RPC with `code` before any text; `retry_after_ms` goes into the trailing metadata."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int | None = None):
        super().__init__(message)
        self.code, self.retry_after_ms = code, retry_after_ms


def request_id_of(context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and REQUEST_ID_RE.match(value):
            return value
    return uuid.uuid4().hex


def usage_of(chunk: Chunk) -> chat_pb2.Usage:
    return chat_pb2.Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens)


CONTEXT_SLACK = 8      # tokens for the "问题：" joiner around the articles, which with_context does not count


@dataclass
class Grounding:
    """What retrieval gave an answer: the articles put in its prompt and cited, or that none could be trusted."""
    hits: list[Hit] = field(default_factory=list)
    no_article: bool = False      # retrieval was asked for, but no article cleared retrieval.min_confidence


NO_GROUNDING = Grounding()        # what every message but the last carries


def citations_of(hits: list[Hit]) -> list[chat_pb2.Citation]:
    return [chat_pb2.Citation(law=h.law, article=h.article, snippet=h.text[:SNIPPET_CHARS], score=h.score,
                              confidence=h.confidence) for h in hits]


class ChatService(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, slot: EngineSlot, cfg: ServerConfig, metrics: Metrics, limiter: Limiter, breaker: Breaker,
                 keys: KeyStore, retriever: Retriever | None = None):
        self.slot, self.cfg, self.metrics = slot, cfg, metrics
        self.defaults = cfg.generation
        self.limiter, self.breaker, self.keys = limiter, breaker, keys
        self.retriever = retriever
        self.trusted_proxies = cfg.limits.networks()
        self.stopping = False        # set by the app at shutdown: an engine closing then is not a failure

    async def ChatStream(self, request, context) -> AsyncIterator[chat_pb2.ChatStreamResponse]:
        async for chunk, degraded, grounding in self.generate("ChatStream", request, context):
            if chunk.finish_reason is None:
                yield chat_pb2.ChatStreamResponse(delta=chunk.delta, degraded=degraded)
            else:
                yield chat_pb2.ChatStreamResponse(delta=chunk.delta, finish_reason=FINISH_REASONS[chunk.finish_reason],
                                                  usage=usage_of(chunk), degraded=degraded,
                                                  citations=citations_of(grounding.hits),
                                                  no_governing_article=grounding.no_article)

    async def Chat(self, request, context) -> chat_pb2.ChatResponse:
        parts, last, degraded, grounding = [], None, False, Grounding()
        async for chunk, degraded, grounding in self.generate("Chat", request, context):
            parts.append(chunk.delta)
            last = chunk
        return chat_pb2.ChatResponse(text="".join(parts), finish_reason=FINISH_REASONS[last.finish_reason],
                                     usage=usage_of(last), degraded=degraded, citations=citations_of(grounding.hits),
                                     no_governing_article=grounding.no_article)

    def _retrieval_of(self, request) -> int:
        """How many articles this request wants (0 = no retrieval); INVALID_ARGUMENT / FAILED_PRECONDITION."""
        r, cfg = request.retrieval, self.cfg.retrieval
        enabled = r.enabled if r.HasField("enabled") else cfg.default_enabled
        top_k = r.top_k if r.HasField("top_k") else cfg.top_k
        if not enabled:
            return 0
        if not 1 <= top_k <= MAX_TOP_K:
            raise InvalidRequest(f"retrieval.top_k must be in [1, {MAX_TOP_K}], got {top_k}")
        if self.retriever is None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          "retrieval is not configured on this server (retrieval.index or retrieval.opensearch.url)")
        return top_k

    def _build_request(self, engine, grounding: Grounding, messages, sampling, max_new, stops, ignore_eos,
                       adapter) -> GenerationRequest:
        hits = grounding.hits
        try:
            prompt_ids = engine.encode_chat(messages)
            if grounding.no_article:     # the prompt says no governing article was found, as the answer will
                noted = engine.encode_chat(without_articles(messages))
                if len(noted) < engine.max_len:
                    prompt_ids = noted
            if hits:   # the articles take what the model has room for beside the question, up to max_context_tokens
                budget = min(self.cfg.retrieval.max_context_tokens, engine.max_len - 1 - len(prompt_ids) - CONTEXT_SLACK)
                with_articles = engine.encode_chat(with_context(messages, [(h.heading, h.text) for h in hits],
                                                                engine.tokenizer, budget))
                if len(with_articles) < engine.max_len:
                    prompt_ids = with_articles
        except PromptError as e:
            raise InvalidRequest(str(e)) from None
        room = engine.max_len - len(prompt_ids)
        if room < 1:
            raise InvalidRequest(f"the prompt has {len(prompt_ids)} tokens; this model takes at most "
                                 f"{engine.max_len - 1}")
        return GenerationRequest(prompt_ids, sampling, min(max_new, room), stops, ignore_eos=ignore_eos,
                                 adapter=adapter or None)

    def _verdict(self, engine, context):
        """A breaker ticket to use the engine, or the reason for the canned answer. A replica that cannot use
        its engine refuses with UNAVAILABLE instead when the proxy in front will retry another replica."""
        if self.slot.restarting or not getattr(engine, "alive", True):
            verdict = "engine_down"
        else:
            verdict = self.breaker.admit()
        if isinstance(verdict, str) and verdict != "switch" and proxy_can_retry(
                context.invocation_metadata(), self.cfg.degraded.proxy_attempts):
            raise Refused(grpc.StatusCode.UNAVAILABLE, f"this replica cannot use its model now ({verdict}); the "
                          "proxy retries another")
        return verdict

    def _admit(self, request, context) -> tuple[str, tuple]:
        """Checks that need no model, cheapest first: serving at all, the request itself, the rate limits."""
        if self.slot.draining:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the server is draining; use another replica")
        if self.slot.engine is None:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        parsed = (parse_messages(request, self.defaults), parse_sampling(request, self.defaults),
                  *parse_stopping(request, self.defaults), request.stopping.ignore_eos, request.adapter)
        top_k = self._retrieval_of(request)
        client = client_id(context, self.keys, self.trusted_proxies)
        decision = self.limiter.admit(client)
        if not decision.admitted:
            self.metrics.rate_limited.labels(decision.reason).inc()
            ms = max(1, math.ceil(decision.retry_after * 1000))
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"rate limit ({decision.reason}) reached; retry in {ms} ms", ms)
        self.metrics.admitted.inc()
        return client, parsed, top_k

    async def _canned(self, reason: str, hits: list[Hit]) -> AsyncIterator[Chunk]:
        """The canned answer, then the retrieved articles verbatim: retrieval needs no model."""
        self.metrics.degraded.labels(reason).inc()
        text = self.cfg.degraded.message
        if hits:
            text += "\n\n以下法条可能与您的问题有关（原文，供参考）：\n" + "\n".join(f"{h.heading}：{h.text}" for h in hits)
        deltas = canned_deltas(text)
        for d in deltas[:-1]:
            yield Chunk(d)
        yield Chunk(deltas[-1], DEGRADED)

    async def generate(self, method: str, request, context) -> AsyncIterator[tuple[Chunk, bool, Grounding]]:
        """The one request path behind every protocol (gRPC here, the OpenAI HTTP API through an adapter of
        `context`): admission, retrieval, the breaker, the engine, metrics; errors end it via context.abort."""
        rid = request_id_of(context)
        trailer = (("x-request-id", rid),)
        m, breaker = self.metrics, self.breaker
        t0 = time.perf_counter()
        t_last = ttft = ticket = engine = None
        code, last, degraded, grounding = "OK", None, False, Grounding()
        with self.slot.request():
            try:
                try:
                    client, parsed, top_k = self._admit(request, context)
                    if top_k:
                        try:
                            with m.retrieval_seconds.time():
                                found = await asyncio.to_thread(self.retriever.search, parsed[0][-1]["content"], top_k)
                        except RetrievalUnavailable as e:   # a search cluster down: the caller may retry
                            m.retrieval_failures.inc()
                            log.warning("request_id=%s retrieval failed: %s", rid, e)
                            raise Refused(grpc.StatusCode.UNAVAILABLE, "statute retrieval is unavailable; retry, or "
                                          "ask without retrieval") from None
                        hits = trusted(found, self.retriever.threshold(self.cfg.retrieval.min_confidence))
                        grounding = Grounding(hits, not hits)
                        if not hits:
                            m.no_article.inc()
                    with self.slot.lease() as engine:
                        verdict = self._verdict(engine, context)
                        if isinstance(verdict, str):       # breaker open, engine down or switch on: the canned answer
                            degraded, stream = True, self._canned(verdict, grounding.hits)
                        else:
                            ticket = verdict
                            gen_request = await asyncio.to_thread(self._build_request, engine, grounding, *parsed)
                            self.limiter.charge_prompt(client, len(gen_request.prompt_ids))
                            stream = engine.stream(gen_request, self.cfg.breaker.stall_seconds)
                        charged, charging = 0, self.limiter.limits_tokens
                        async for chunk in stream:
                            if last is None:
                                # headers with the first chunk: an error before it is a trailers-only response,
                                # which a proxy (Envoy's retry_on: unavailable) may retry on another replica
                                await context.send_initial_metadata(trailer)
                            if ticket is not None and not ticket.settled:
                                breaker.success(ticket)    # the first token: the engine works (probes judged here)
                            now = time.perf_counter()
                            if ttft is None:
                                ttft = now - t0
                                m.ttft.observe(ttft)
                            else:
                                m.itl.observe(now - t_last)
                            t_last, last = now, chunk
                            if charging and chunk.completion_tokens > charged:
                                self.limiter.charge_tokens(client, chunk.completion_tokens - charged)
                                charged = chunk.completion_tokens
                            yield chunk, degraded, grounding if chunk.finish_reason is not None else NO_GROUNDING
                except (Refused, InvalidRequest, InvalidGeneration, EngineOverloaded) as e:
                    if isinstance(e, Refused):
                        status, ms = e.code, e.retry_after_ms
                    elif isinstance(e, UnknownAdapter):
                        status, ms = grpc.StatusCode.NOT_FOUND, None
                    elif isinstance(e, (InvalidRequest, InvalidGeneration)):
                        status, ms = grpc.StatusCode.INVALID_ARGUMENT, None
                    else:
                        status, ms = grpc.StatusCode.RESOURCE_EXHAUSTED, QUEUE_RETRY_AFTER_MS
                    code = status.name
                    message = f"server overloaded ({e}); retry later" if isinstance(e, EngineOverloaded) else str(e)
                    await context.abort(status, message,
                                        trailing_metadata=trailer + ((("retry-after-ms", str(ms)),) if ms else ()))
                except (EngineStalled, EngineClosed) as e:
                    if isinstance(e, EngineStalled):
                        failure = EngineFailure("stalled", ("stalled", id(engine), e.steps))
                    else:
                        failure = EngineFailure("engine_gone", ("engine_gone", id(engine)))
                    if ticket is not None:
                        if self.stopping and failure.kind == "engine_gone":
                            breaker.ignore(ticket)
                        elif breaker.failure(ticket, failure):
                            m.breaker_failures.labels(failure.kind).inc()
                    code = "UNAVAILABLE"
                    log.error("request_id=%s engine unavailable: %s", rid, e)
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"{e} (request id {rid})", trailing_metadata=trailer)
                except StepFailed as e:
                    # one failure per failed step, however many streams it ended; none if the engine pinned it
                    # on this request alone (the others in its batch went on)
                    if ticket is not None:
                        if e.isolated:
                            breaker.ignore(ticket)
                        elif breaker.failure(ticket, EngineFailure("error", ("step", id(engine), e.step))):
                            m.breaker_failures.labels("error").inc()
                    code = "INTERNAL"
                    log.error("request_id=%s generation failed: %s", rid, e)
                    await context.abort(grpc.StatusCode.INTERNAL, f"generation failed (request id {rid})"
                                        + ("; this request alone: the others in its batch went on" if e.isolated
                                           else ""), trailing_metadata=trailer)
                except Exception:
                    if ticket is not None and breaker.failure(ticket, EngineFailure("error")):
                        m.breaker_failures.labels("error").inc()
                    code = "INTERNAL"
                    log.exception("request_id=%s generation failed", rid)
                    await context.abort(grpc.StatusCode.INTERNAL, f"generation failed (request id {rid})",
                                        trailing_metadata=trailer)
            except (asyncio.CancelledError, GeneratorExit):
                remaining = context.time_remaining()   # the client's own deadline cancel can beat the server's timer
                code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= DEADLINE_SLACK_S else "CANCELLED"
                raise
            finally:
                if ticket is not None:
                    breaker.ignore(ticket)           # a no-op unless it ended without an outcome
                e2e = time.perf_counter() - t0
                m.requests.labels(method, code).inc()
                if last is not None:
                    m.prompt_tokens.inc(last.prompt_tokens)
                    m.generation_tokens.inc(last.completion_tokens)
                    if last.finish_reason is not None:
                        m.finished.labels(last.finish_reason).inc()
                        m.e2e.observe(e2e)
                        if last.finish_reason != DEGRADED:      # the canned answer never queued
                            m.queue_time.observe(last.queue_seconds)
                            m.request_prompt_tokens.observe(last.prompt_tokens)
                            m.request_generation_tokens.observe(last.completion_tokens)
                log.info("rpc=%s request_id=%s code=%s prompt_tokens=%s completion_tokens=%s finish=%s ttft_ms=%s "
                         "e2e_ms=%.1f", method, rid, code, last.prompt_tokens if last else "-",
                         last.completion_tokens if last else "-", last.finish_reason if last else "-",
                         f"{ttft * 1e3:.1f}" if ttft is not None else "-", e2e * 1e3)
