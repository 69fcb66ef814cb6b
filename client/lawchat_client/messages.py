"""messages: requests from plain Python values, results back as plain Python values (shared by both clients)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypedDict

from lawchat.v1 import chat_pb2

FINISH_REASONS = {
    chat_pb2.FINISH_REASON_EOS_TOKEN: "eos",
    chat_pb2.FINISH_REASON_MAX_TOKENS: "max_tokens",
    chat_pb2.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
    chat_pb2.FINISH_REASON_DEGRADED: "degraded",
}

Messages = str | Sequence[dict] | Sequence[tuple[str, str]]


class ChatOptions(TypedDict, total=False):
    """Keyword options of chat() and chat_stream(), in both clients; unset ones take the server's defaults."""
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: Sequence[str]
    ignore_eos: bool
    retrieval: bool            # statute articles in the prompt; they come back as citations
    retrieval_top_k: int
    adapter: str               # a LoRA adapter the server serves (list_adapters()); "base": the base model
    request_id: str            # sent as x-request-id (logged by the server; echoed back)
    timeout: float             # deadline of this call in seconds (default: the client's)


@dataclass
class ChatResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    request_id: str | None = None
    degraded: bool = False                 # the server's canned answer (model unavailable or switched off)
    citations: list[dict] = field(default_factory=list)   # statute articles: {law, article, snippet, score,
                                                          # confidence (None: the server's index is uncalibrated)}
    no_governing_article: bool = False     # retrieval on, but no article cleared the server's confidence threshold


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
    return [{"law": c.law, "article": c.article, "snippet": c.snippet, "score": c.score,
             "confidence": c.confidence if c.HasField("confidence") else None} for c in citations]


def build_request(message_type, messages: Messages, o: ChatOptions):
    """ChatRequest or ChatStreamRequest; only the options given are set (field presence)."""
    unknown = set(o) - set(ChatOptions.__annotations__)
    if unknown:
        raise TypeError(f"unknown chat option(s) {sorted(unknown)}; known: {sorted(ChatOptions.__annotations__)}")
    sampling = chat_pb2.SamplingParameters()
    for name in ("temperature", "top_p", "top_k", "seed"):
        if o.get(name) is not None:
            setattr(sampling, name, o[name])
    stopping = chat_pb2.StoppingCriteria(stop_sequences=list(o.get("stop") or ()), ignore_eos=bool(o.get("ignore_eos")))
    if o.get("max_new_tokens") is not None:
        stopping.max_new_tokens = o["max_new_tokens"]
    retrieval = chat_pb2.RetrievalOptions()
    if o.get("retrieval") is not None:
        retrieval.enabled = o["retrieval"]
    if o.get("retrieval_top_k") is not None:
        retrieval.top_k = o["retrieval_top_k"]
    return message_type(messages=to_messages(messages), sampling=sampling, stopping=stopping, retrieval=retrieval,
                        adapter=o.get("adapter") or "")


def result_of(resp, request_id: str | None) -> ChatResult:
    return ChatResult(resp.text, FINISH_REASONS.get(resp.finish_reason, "unknown"), resp.usage.prompt_tokens,
                      resp.usage.completion_tokens, request_id, resp.degraded, citations_of(resp.citations),
                      resp.no_governing_article)


class StreamState:
    """What a stream learns from its messages: finish reason, usage, degraded, citations."""

    def __init__(self):
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.degraded = False
        self.citations: list[dict] = []
        self.no_governing_article = False
        self.yielded_text = False

    def read(self, msg) -> str:
        """One ChatStreamResponse -> its text delta ('' for none)."""
        self.degraded = self.degraded or msg.degraded
        if msg.finish_reason != chat_pb2.FINISH_REASON_UNSPECIFIED:
            self.finish_reason = FINISH_REASONS.get(msg.finish_reason, "unknown")
            self.prompt_tokens = msg.usage.prompt_tokens
            self.completion_tokens = msg.usage.completion_tokens
            self.citations = citations_of(msg.citations)
            self.no_governing_article = msg.no_governing_article
        if msg.delta:
            self.yielded_text = True
        return msg.delta


def metadata(api_key: str | None, request_id: str | None) -> list[tuple[str, str]]:
    md = []
    if request_id:
        md.append(("x-request-id", request_id))
    if api_key:
        md.append(("x-api-key", api_key))
    return md
