"""params: validate a ChatRequest / ChatStreamRequest and turn it into engine inputs (INVALID_ARGUMENT on error)."""
from __future__ import annotations

from dataclasses import dataclass

from .engine.sampler import SamplingParams

ROLES = ("system", "user", "assistant")


class InvalidRequest(ValueError):
    """The request is malformed; the message goes back to the client with INVALID_ARGUMENT."""


@dataclass
class GenerationDefaults:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    max_new_tokens_limit: int = 2048     # the most a request may ask for
    max_stop_sequences: int = 8
    max_stop_sequence_chars: int = 64
    max_request_bytes: int = 262144      # a serialized request larger than this is refused
    max_messages: int = 64               # turns per request
    max_message_chars: int = 16384       # characters per turn

    def validate(self) -> None:
        if self.max_new_tokens_limit < 1 or not 1 <= self.max_new_tokens <= self.max_new_tokens_limit:
            raise ValueError(f"generation.max_new_tokens ({self.max_new_tokens}) must be in "
                             f"[1, max_new_tokens_limit ({self.max_new_tokens_limit})]: a larger default would "
                             "turn every request that leaves it unset into INVALID_ARGUMENT")
        if not 0.0 <= self.temperature <= 2.0 or not 0.0 < self.top_p <= 1.0 or self.top_k < 0:
            raise ValueError("generation: temperature must be in [0, 2], top_p in (0, 1], top_k >= 0")
        for name in ("max_stop_sequences", "max_stop_sequence_chars", "max_request_bytes", "max_messages",
                     "max_message_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"generation.{name} must be >= 1")


def parse_messages(request, d: GenerationDefaults) -> list[dict]:
    size = request.ByteSize()
    if size > d.max_request_bytes:
        raise InvalidRequest(f"the request has {size} bytes; this server takes at most {d.max_request_bytes}")
    if not request.messages:
        raise InvalidRequest("messages is empty: send at least one user message")
    if len(request.messages) > d.max_messages:
        raise InvalidRequest(f"{len(request.messages)} messages; this server takes at most {d.max_messages}")
    out = []
    for i, m in enumerate(request.messages):
        if m.role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {list(ROLES)}, got {m.role!r}")
        if len(m.content) > d.max_message_chars:
            raise InvalidRequest(f"messages[{i}].content has {len(m.content)} characters; at most "
                                 f"{d.max_message_chars}")
        if m.role != "assistant" and not m.content.strip():
            raise InvalidRequest(f"messages[{i}].content is empty")
        out.append({"role": m.role, "content": m.content})
    if out[-1]["role"] != "user":
        raise InvalidRequest("the last message must have role 'user'")
    return out


def parse_sampling(request, d: GenerationDefaults) -> SamplingParams:
    s = request.sampling
    temperature = s.temperature if s.HasField("temperature") else d.temperature
    top_p = s.top_p if s.HasField("top_p") else d.top_p
    top_k = s.top_k if s.HasField("top_k") else d.top_k
    if not 0.0 <= temperature <= 2.0:   # NaN fails both comparisons
        raise InvalidRequest(f"sampling.temperature must be in [0, 2], got {temperature:g}")
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequest(f"sampling.top_p must be in (0, 1], got {top_p:g}")
    return SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                          seed=int(s.seed) if s.HasField("seed") else None)


def parse_stopping(request, d: GenerationDefaults) -> tuple[int, list[str]]:
    st = request.stopping
    max_new = st.max_new_tokens if st.HasField("max_new_tokens") else d.max_new_tokens
    if not 1 <= max_new <= d.max_new_tokens_limit:
        raise InvalidRequest(f"stopping.max_new_tokens must be in [1, {d.max_new_tokens_limit}], got {max_new}")
    stops = list(st.stop_sequences)
    if len(stops) > d.max_stop_sequences:
        raise InvalidRequest(f"at most {d.max_stop_sequences} stop_sequences, got {len(stops)}")
    for i, s in enumerate(stops):
        if not s or len(s) > d.max_stop_sequence_chars:
            raise InvalidRequest(f"stopping.stop_sequences[{i}] must have 1..{d.max_stop_sequence_chars} characters")
    return int(max_new), stops
