"""retry: which failures are worth another attempt, and how long to wait before it.

Retried: UNAVAILABLE (a replica restarting, a balancer with no healthy upstream yet) and RESOURCE_EXHAUSTED
(rate limit or full queue; the server's `retry-after-ms` is honoured). Never retried: anything that would fail
the same way again (INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED ...), a deadline, and a stream that
has already yielded text (the caller has seen part of an answer; a second one could differ).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import grpc

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


class LawchatError(Exception):
    """An RPC failed. `code` is the grpc.StatusCode; `retry_after` (seconds) is set on RESOURCE_EXHAUSTED;
    `attempts` is how many calls were made."""

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str | None = None,
                 retry_after: float | None = None, attempts: int = 1):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details, self.request_id, self.retry_after = code, details, request_id, retry_after
        self.attempts = attempts


def error_from_rpc(err: grpc.RpcError, attempts: int = 1) -> LawchatError:
    """grpc.RpcError (sync) or grpc.aio.AioRpcError -> LawchatError with the request id and retry hint."""
    trailing = dict(err.trailing_metadata() or ())
    initial = dict(err.initial_metadata() or ()) if hasattr(err, "initial_metadata") else {}
    retry = trailing.get("retry-after-ms")
    return LawchatError(err.code(), err.details() or "", initial.get("x-request-id"),
                        float(retry) / 1000 if retry else None, attempts)


@dataclass
class RetryPolicy:
    """Jittered exponential backoff: attempt n waits uniform(0, min(max_backoff, initial_backoff * multiplier**n)),
    and at least the server's retry-after hint (capped at max_backoff)."""
    max_attempts: int = 4            # calls in all, the first included; 1 = no retries
    initial_backoff: float = 0.1     # seconds
    max_backoff: float = 5.0
    multiplier: float = 2.0
    retry_on: frozenset = field(default=RETRYABLE)

    def should_retry(self, error: LawchatError, attempt: int) -> bool:
        """attempt: calls made so far."""
        return attempt < self.max_attempts and error.code in self.retry_on

    def backoff(self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        wait = (rng or random).uniform(0, cap)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_backoff))
        return wait


    def next_wait(self, error: LawchatError, attempt: int, deadline: Deadline, yielded_text: bool = False):
        """Seconds to wait before the next attempt, or None: raise `error` (not retryable, out of attempts, text
        already yielded, or the wait would end past the deadline)."""
        if yielded_text or not self.should_retry(error, attempt):
            return None
        wait = self.backoff(attempt, error.retry_after)
        return wait if deadline.allows(wait) else None


class Deadline:
    """An overall deadline across attempts (None = no deadline)."""

    def __init__(self, timeout: float | None):
        self.end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.end is None else max(0.0, self.end - time.monotonic())

    def allows(self, wait: float) -> bool:
        return self.end is None or time.monotonic() + wait < self.end


NO_RETRY = RetryPolicy(max_attempts=1)
