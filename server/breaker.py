"""breaker: a circuit breaker around the engine (the `circuitbreaker` package) plus the manual degraded switch.

Decisions, each tested in tests/test_guards.py:
- What counts: failed engine steps, a stalled engine (no step for `stall_seconds` while a request waits on it,
  see `engine.read_chunks`) and a dead engine process are failures; a client's own cancel or deadline, a
  refused request and a step failure the engine pinned on one request alone (`StepFailed.isolated`) are
  neither failure nor success. The package resets its count on any exception it is not told to expect
  (CancelledError and GeneratorExit included), so outcomes are recorded here explicitly, never by wrapping
  the stream in the breaker.
- One failure per event, not per request: a failure carries a key (the failed step's number, the stalled
  engine and its step count, the dead engine) and a key is counted once, however many streams it ended.
- Success is the first token: a request that got one has shown the engine works (a probe is judged then,
  not when its whole stream ends). Consecutive failures open it (the package's rule: a success resets the
  count).
- Half-open: the package lets every call through once the recovery time has passed; here at most
  `half_open_probes` requests at a time are probes, the others keep getting the canned answer. A probe's
  success closes the breaker, its failure opens it again for another `recovery_seconds`.
- Successes of requests admitted before the breaker last opened, or before the last counted failure, are
  ignored (a stream that started while all was well, or a first token that raced a failure, says nothing about
  the engine now); failures count whenever they happen (a step that failed now is news about the engine now),
  except while open.
- The clock is injectable (tests step it instead of sleeping): the package reads `time.monotonic` for its
  open window, so the subclass below keeps that window on the breaker's clock.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from circuitbreaker import STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN, CircuitBreaker

log = logging.getLogger("lawchat.breaker")

STATES = (STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN)   # metric value = index


@dataclass
class BreakerConfig:
    failure_threshold: int = 5       # consecutive engine failures that open the breaker
    recovery_seconds: int = 30       # open this long before probing (whole seconds: the package's resolution)
    half_open_probes: int = 1        # requests let through at a time while half-open
    stall_seconds: float = 30.0      # a request whose engine makes no step this long is failed as stalled

    def validate(self) -> None:
        if self.failure_threshold < 1 or self.recovery_seconds < 1 or self.half_open_probes < 1:
            raise ValueError("breaker: failure_threshold, recovery_seconds and half_open_probes must be >= 1")
        if not self.stall_seconds > 0:
            raise ValueError(f"breaker.stall_seconds must be > 0, got {self.stall_seconds}")


class EngineFailure(Exception):
    """What the breaker counts. `kind`: error, stalled, engine_gone; `key`: the event (counted once), or None
    for one of its own."""

    def __init__(self, kind: str, key=None):
        super().__init__(kind)
        self.kind, self.key = kind, key


class _ClockedCircuitBreaker(CircuitBreaker):
    """The package's breaker with its open window on an injectable clock (fractional seconds)."""

    def __init__(self, clock, **kw):
        self._clock = clock
        super().__init__(**kw)
        self._opened = clock()

    @property
    def open_remaining(self) -> float:
        return (self._opened + self._recovery_timeout) - self._clock()

    def _CircuitBreaker__call_failed(self) -> None:     # the package's rule, its open time on our clock
        self._failure_count += 1
        if self._failure_count >= self._failure_threshold:
            self._state = STATE_OPEN
            self._opened = self._clock()


@dataclass
class Ticket:
    epoch: int            # the breaker's opening count when the request was admitted
    probe: bool
    failures: int = 0     # failures counted before it was admitted
    settled: bool = False


class Breaker:
    def __init__(self, config: BreakerConfig, clock=time.monotonic):
        config.validate()
        self.config = config
        self._cb = _ClockedCircuitBreaker(clock, failure_threshold=config.failure_threshold,
                                          recovery_timeout=config.recovery_seconds,
                                          expected_exception=EngineFailure, name="lawchat-engine")
        self._counted: deque = deque(maxlen=1024)   # keys of failures already counted
        self._failures = 0                          # failures counted so far (tickets note it at admission)
        self._lock = threading.Lock()
        self._epoch = 0
        self._probes = 0
        self.last_failure = ""
        self.switch_on = False           # the operator's manual degraded switch
        self.switch_reason = ""

    @property
    def state(self) -> str:
        return self._cb.state

    @property
    def failures(self) -> int:
        return self._cb.failure_count

    @property
    def open_remaining(self) -> float:
        return max(0.0, float(self._cb.open_remaining)) if self._cb.state == STATE_OPEN else 0.0

    def set_switch(self, on: bool, reason: str) -> None:
        self.switch_on, self.switch_reason = on, reason if on else ""
        log.warning("degraded switch %s%s", "ON" if on else "off", f" ({reason})" if on and reason else "")

    def admit(self) -> Ticket | str:
        """A ticket to use the engine, or why not: 'switch' or 'breaker_open'."""
        if self.switch_on:
            return "switch"
        with self._lock:
            state = self._cb.state
            if state == STATE_OPEN:
                return "breaker_open"
            if state == STATE_HALF_OPEN:
                if self._probes >= self.config.half_open_probes:
                    return "breaker_open"
                self._probes += 1
                return Ticket(self._epoch, True, self._failures)
            return Ticket(self._epoch, False, self._failures)

    def _settle(self, ticket: Ticket) -> bool:
        """Free the probe slot once; -> whether the outcome still counts."""
        if ticket.settled:
            return False
        ticket.settled = True
        if ticket.probe:
            self._probes -= 1
        return ticket.epoch == self._epoch

    def success(self, ticket: Ticket) -> None:
        """A first token. It resets the count only if no failure was counted since the request was admitted: a
        token that raced a failure (queued before it, read after) says nothing about the engine since."""
        with self._lock:
            if self._settle(ticket) and ticket.failures == self._failures:
                with self._cb:             # no exception: the package resets its count and closes
                    pass

    def failure(self, ticket: Ticket | None, error: EngineFailure) -> bool:
        """Count an engine failure once per key (a ticket already settled by its first token still reports a
        step that failed later); -> whether it was counted."""
        with self._lock:
            if ticket is not None:
                self._settle(ticket)
            was = self._cb.state
            if was == STATE_OPEN or (error.key is not None and error.key in self._counted):
                return False
            if error.key is not None:
                self._counted.append(error.key)
            self._failures += 1
            self.last_failure = error.kind
            try:
                with self._cb:
                    raise error
            except EngineFailure:
                pass
            if self._cb.state == STATE_OPEN and was != STATE_OPEN:
                self._epoch += 1
                log.error("circuit breaker OPEN after %d consecutive engine failures (last: %s); canned answers "
                          "for %d s", self._cb.failure_count, error.kind, self.config.recovery_seconds)
            return True

    def ignore(self, ticket: Ticket) -> None:
        """The client left (cancel, deadline) or was refused: neither a success nor a failure of the engine.
        A no-op for a ticket already settled, so callers may call it in `finally`."""
        with self._lock:
            self._settle(ticket)
