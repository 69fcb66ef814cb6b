"""limiter: token buckets in requests/s and generated tokens/s, one global and one per client.

A request is admitted when every request bucket has a whole token and no token bucket is in debt;
generated tokens are charged as they stream, so a bucket can go below zero (a client that asked for
2,048 tokens pays for all of them) and stays closed until it has refilled. A refusal carries the
time until the emptiest bucket allows the request again (`retry-after-ms`).

Per-client buckets live in an LRU map bounded by `max_clients`. An entry is dropped only once all its
buckets have refilled (idle for `client_idle_seconds`, or the least recently seen when the map is full): a
client that owes keeps its debt, whatever passes by. When the map is full of clients that owe, a new client
is charged to one shared overflow entry until room frees up, so memory stays bounded and a flood of new
identities buys no fresh buckets. Prompt tokens can be charged too (`prompt_token_weight`).

Who a client is: its API key's name, else its address; `trusted_proxies` lists the balancers (Envoy)
whose `x-forwarded-for` is believed (`client_address`).

Written here rather than taken from a package: the rate-limit packages on PyPI (limits, pyrate-limiter,
aiolimiter) either block until capacity is there or answer yes/no without the wait time, and none
charges after the fact (tokens as they stream) or changes rate in place at run time.
"""
from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import islice

REQUESTS, TOKENS = "requests", "tokens"
OVERFLOW = "overflow"       # the shared entry of new clients while the map is full of clients that owe
EVICT_SCAN = 32             # least recently seen entries looked at for one that can go


@dataclass
class Rate:
    rate: float = 0.0      # per second; 0 = unlimited
    burst: float = 0.0     # bucket size; 0 = one second's worth of rate (at least 1)

    def validate(self, where: str) -> None:
        for name in ("rate", "burst"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{where}.{name} must be a finite number >= 0, got {v!r}")

    @property
    def size(self) -> float:
        return self.burst if self.burst > 0 else max(self.rate, 1.0)


@dataclass
class LimitsConfig:
    global_requests: Rate = field(default_factory=Rate)   # all clients together
    global_tokens: Rate = field(default_factory=Rate)
    client_requests: Rate = field(default_factory=Rate)   # each client (API key, else peer address)
    client_tokens: Rate = field(default_factory=Rate)
    max_clients: int = 10000             # per-client buckets kept; the least recently seen that owe nothing go first
    client_idle_seconds: float = 600.0   # a client unseen this long is forgotten once its buckets are full again
    prompt_token_weight: float = 0.0     # prompt tokens charged to the token buckets at this weight (0 = free)
    trusted_proxies: list[str] = field(default_factory=list)   # addresses/CIDRs whose x-forwarded-for is believed

    RATES = ("global_requests", "global_tokens", "client_requests", "client_tokens")

    def validate(self) -> None:
        for name in self.RATES:
            getattr(self, name).validate(f"limits.{name}")
        if self.max_clients < 1 or not self.client_idle_seconds > 0:
            raise ValueError("limits.max_clients must be >= 1 and limits.client_idle_seconds > 0")
        if not (math.isfinite(self.prompt_token_weight) and self.prompt_token_weight >= 0):
            raise ValueError(f"limits.prompt_token_weight must be a finite number >= 0, got {self.prompt_token_weight}")
        self.networks()

    def networks(self) -> list:
        try:
            return [ipaddress.ip_network(a, strict=False) for a in self.trusted_proxies]
        except ValueError as e:
            raise ValueError(f"limits.trusted_proxies: {e}") from None


def client_address(peer: str, forwarded_for: str | None, trusted: list) -> str:
    """The client's address: the gRPC peer ('ipv4:1.2.3.4:5678'), or — when the peer is a trusted proxy — the
    rightmost address in x-forwarded-for that is not itself a trusted proxy (entries left of it were written
    by the client and prove nothing)."""
    host = peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer
    host = host.split(":", 1)[1].strip("[]") if host.startswith(("ipv4:", "ipv6:")) else host
    if not trusted or not forwarded_for or not _in(host, trusted):
        return host
    for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
        if not hop:
            continue
        if not _in(hop, trusted):
            return hop
    return host


def _in(address: str, networks: list) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in n for n in networks)


class TokenBucket:
    """Refills at `rate` per second up to `size`; `level` may go negative (debt from charged tokens)."""

    def __init__(self, rate: Rate, now: float):
        self.rate, self.size = rate.rate, rate.size
        self.level = self.size
        self.t = now

    def refill(self, now: float) -> None:
        if now > self.t:
            self.level = min(self.size, self.level + (now - self.t) * self.rate)
        self.t = now

    def wait_for(self, need: float) -> float:
        """Seconds until `level >= need` (0 if it already is). Call refill first."""
        if self.rate <= 0 or self.level >= need:
            return 0.0
        return (need - self.level) / self.rate

    def reconfigure(self, rate: Rate) -> None:
        self.rate, self.size = rate.rate, rate.size
        self.level = min(self.level, self.size)


@dataclass
class Decision:
    admitted: bool
    reason: str = ""             # which bucket refused: global_requests, client_tokens, ...
    retry_after: float = 0.0     # seconds


class Limiter:
    def __init__(self, config: LimitsConfig, clock=time.monotonic):
        config.validate()
        self.config = config
        self.clock = clock
        self._lock = threading.Lock()
        now = clock()
        self._global = {REQUESTS: TokenBucket(config.global_requests, now),
                        TOKENS: TokenBucket(config.global_tokens, now)}
        self._clients: OrderedDict[str, dict[str, TokenBucket]] = OrderedDict()
        self._overflow: dict[str, TokenBucket] | None = None

    def _new_buckets(self, now: float) -> dict[str, TokenBucket]:
        return {REQUESTS: TokenBucket(self.config.client_requests, now),
                TOKENS: TokenBucket(self.config.client_tokens, now)}

    def _client(self, client: str, now: float) -> dict[str, TokenBucket]:
        buckets = self._clients.get(client)
        if buckets is not None:
            self._clients.move_to_end(client)
            return buckets
        self._expire(now, room_for=1)
        if len(self._clients) >= self.config.max_clients:    # all owe: the shared overflow entry
            if self._overflow is None:
                self._overflow = self._new_buckets(now)
            return self._overflow
        buckets = self._clients[client] = self._new_buckets(now)
        return buckets

    @staticmethod
    def _settled(buckets: dict[str, TokenBucket], now: float) -> bool:
        """Every bucket full again: a fresh entry would be the same, so this one can go."""
        for b in buckets.values():
            b.refill(now)
            if b.level < b.size:
                return False
        return True

    def _expire(self, now: float, room_for: int = 0) -> None:
        """Drop idle or (when the map is full) least recently seen entries, but never one that owes; at most
        EVICT_SCAN owing entries are passed over (memory stays bounded: new clients then share the overflow)."""
        idle, cap, passed = self.config.client_idle_seconds, self.config.max_clients - room_for, 0
        while passed < EVICT_SCAN:
            name = next(islice(self._clients, passed, None), None)
            if name is None:
                break
            buckets = self._clients[name]
            if len(self._clients) <= cap and now - buckets[REQUESTS].t <= idle:
                break                                   # the rest were seen more recently
            if self._settled(buckets, now):
                del self._clients[name]
            else:
                passed += 1
        if self._overflow is not None and self._settled(self._overflow, now):
            self._overflow = None

    def admit(self, client: str) -> Decision:
        """Take one request token from the global and the client's request buckets, or say how long to wait."""
        with self._lock:
            now = self.clock()
            mine = self._client(client, now)
            checks = (("global_requests", self._global[REQUESTS], 1.0), ("client_requests", mine[REQUESTS], 1.0),
                      ("global_tokens", self._global[TOKENS], 0.0), ("client_tokens", mine[TOKENS], 0.0))
            worst = Decision(True)
            for name, bucket, need in checks:
                bucket.refill(now)
                wait = bucket.wait_for(need)
                if wait > worst.retry_after:
                    worst = Decision(False, name, wait)
            if worst.admitted:
                self._global[REQUESTS].level -= 1.0 if self._global[REQUESTS].rate > 0 else 0.0
                mine[REQUESTS].level -= 1.0 if mine[REQUESTS].rate > 0 else 0.0
            return worst

    @property
    def limits_tokens(self) -> bool:
        """Whether any token bucket is set (callers skip charge_tokens otherwise: it is on the per-chunk path)."""
        return self.config.global_tokens.rate > 0 or self.config.client_tokens.rate > 0

    def charge_prompt(self, client: str, n: int) -> None:
        """A request's prompt tokens, at `prompt_token_weight` (off at 0)."""
        if self.config.prompt_token_weight > 0 and self.limits_tokens:
            self.charge_tokens(client, n * self.config.prompt_token_weight)

    def charge_tokens(self, client: str, n: float) -> None:
        """Generated tokens, charged as they stream (the buckets may go into debt)."""
        if n <= 0:
            return
        with self._lock:
            now = self.clock()
            mine = self._clients.get(client, self._overflow)
            for bucket in (self._global[TOKENS], mine[TOKENS] if mine else None):
                if bucket is not None and bucket.rate > 0:
                    bucket.refill(now)
                    bucket.level -= n

    def update(self, **rates: Rate) -> LimitsConfig:
        """Change some of the four rates in place (existing buckets keep their level, capped at the new size)."""
        with self._lock:
            for name, rate in rates.items():
                if name not in LimitsConfig.RATES:
                    raise ValueError(f"unknown limit {name!r}; expected one of {list(LimitsConfig.RATES)}")
                rate.validate(f"limits.{name}")
            for name, rate in rates.items():
                setattr(self.config, name, rate)
                scope, kind = name.split("_")
                if scope == "global":
                    self._global[kind].reconfigure(rate)
                else:
                    for buckets in self._clients.values():
                        buckets[kind].reconfigure(rate)
            return self.config

    @property
    def num_clients(self) -> int:
        return len(self._clients)
