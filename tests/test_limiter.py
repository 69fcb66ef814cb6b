"""server/limiter.py on a fake clock: refill, retry-after from the bucket, token debt, bounded client memory, updates."""
from __future__ import annotations

import pytest

from lawchat_server.limiter import Limiter, LimitsConfig, Rate


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_request_bucket_burst_then_refill_and_retry_after_from_the_bucket():
    clock = Clock()
    lim = Limiter(LimitsConfig(client_requests=Rate(rate=2, burst=3)), clock)
    assert [lim.admit("a").admitted for _ in range(4)] == [True, True, True, False]
    d = lim.admit("a")
    assert (d.admitted, d.reason) == (False, "client_requests")
    assert d.retry_after == pytest.approx(0.5)          # one token at 2/s
    clock.t += 0.3
    assert lim.admit("a").retry_after == pytest.approx(0.2)
    clock.t += 0.2
    assert lim.admit("a").admitted
    assert lim.admit("b").admitted                      # another client has its own bucket


def test_tokens_are_charged_as_they_stream_and_debt_closes_the_bucket():
    clock = Clock()
    lim = Limiter(LimitsConfig(client_tokens=Rate(rate=100, burst=100)), clock)
    assert lim.admit("a").admitted                      # level 100 >= 0
    for _ in range(30):
        lim.charge_tokens("a", 10)                      # 300 tokens streamed: level -200
    d = lim.admit("a")
    assert (d.admitted, d.reason) == (False, "client_tokens")
    assert d.retry_after == pytest.approx(2.0)          # until the debt is paid at 100/s
    clock.t += 2.0
    assert lim.admit("a").admitted


def test_global_bucket_counts_every_client_and_the_worst_wait_is_reported():
    clock = Clock()
    lim = Limiter(LimitsConfig(global_requests=Rate(rate=1, burst=2), client_requests=Rate(rate=0.5, burst=1)), clock)
    assert lim.admit("a").admitted and lim.admit("b").admitted
    d = lim.admit("a")                    # global empty (1 s) and a's bucket empty (2 s): the longer wait
    assert (d.reason, d.retry_after) == ("client_requests", pytest.approx(2.0))
    d = lim.admit("c")
    assert (d.reason, d.retry_after) == ("global_requests", pytest.approx(1.0))


def test_refused_requests_take_nothing():
    clock = Clock()
    lim = Limiter(LimitsConfig(global_requests=Rate(rate=1, burst=1), client_requests=Rate(rate=1, burst=5)), clock)
    assert lim.admit("a").admitted
    for _ in range(10):
        assert not lim.admit("a").admitted     # refused by the global bucket: a's own bucket keeps its tokens
    clock.t += 1.0
    assert sum(lim.admit("a").admitted for _ in range(5)) == 1
    clock.t += 1.0
    assert lim.admit("a").admitted


def test_a_flood_of_distinct_clients_is_bounded_and_idle_ones_expire():
    clock = Clock()
    lim = Limiter(LimitsConfig(client_requests=Rate(rate=1, burst=1), max_clients=100, client_idle_seconds=60), clock)
    for i in range(10_000):
        lim.admit(f"peer:{i}")
        assert lim.num_clients <= 100
    clock.t += 61
    lim.admit("late")
    assert lim.num_clients == 1


def test_update_changes_rates_in_place_and_rejects_bad_values():
    clock = Clock()
    lim = Limiter(LimitsConfig(client_requests=Rate(rate=1, burst=1)), clock)
    assert lim.admit("a").admitted and not lim.admit("a").admitted
    lim.update(client_requests=Rate(rate=0))            # 0 = unlimited, also for existing clients
    assert all(lim.admit("a").admitted for _ in range(50))
    lim.update(client_requests=Rate(rate=10, burst=2))
    assert lim.config.client_requests == Rate(10, 2)
    with pytest.raises(ValueError, match="rate must be a finite number >= 0"):
        lim.update(client_requests=Rate(rate=float("nan")))
    with pytest.raises(ValueError, match="unknown limit"):
        lim.update(everyone=Rate(rate=1))
    assert lim.config.client_requests == Rate(10, 2)    # a rejected update changes nothing


def test_a_debt_survives_any_number_of_clients_passing_by():
    """Eviction used to forget a client that owed (its LRU entry went when 100 others came): not any more."""
    clock = Clock()
    lim = Limiter(LimitsConfig(client_tokens=Rate(rate=1, burst=10), max_clients=10), clock)
    assert lim.admit("debtor").admitted
    lim.charge_tokens("debtor", 100)                  # 90 in debt: 90 s at 1 token/s
    for i in range(1000):
        lim.admit(f"passer-{i}")
        clock.t += 0.01
        assert lim.num_clients <= 10
    d = lim.admit("debtor")
    assert not d.admitted and d.reason == "client_tokens" and d.retry_after == pytest.approx(80, abs=0.5)


def test_when_every_entry_owes_new_clients_share_one_overflow_bucket():
    clock = Clock()
    lim = Limiter(LimitsConfig(client_requests=Rate(rate=0.01, burst=1), max_clients=3), clock)
    for name in ("a", "b", "c"):
        assert lim.admit(name).admitted              # each now owes its request token for 100 s
    assert lim.admit("new-1").admitted               # the overflow entry's one token ...
    for i in range(50):                              # ... and a flood of fresh identities buys no more
        assert not lim.admit(f"new-{i + 2}").admitted
    assert lim.num_clients == 3
    clock.t += 100                                   # all refilled: entries can go, new clients get their own
    assert lim.admit("later").admitted and lim.admit("later-2").admitted


def test_prompt_tokens_are_charged_at_their_weight():
    clock = Clock()
    lim = Limiter(LimitsConfig(client_tokens=Rate(rate=10, burst=10), prompt_token_weight=0.5), clock)
    assert lim.admit("a").admitted
    lim.charge_prompt("a", 100)                      # 50 tokens' worth: 40 in debt
    d = lim.admit("a")
    assert not d.admitted and d.retry_after == pytest.approx(4.0)
    free = Limiter(LimitsConfig(client_tokens=Rate(rate=10, burst=10)), clock)
    free.admit("a")
    free.charge_prompt("a", 100)                     # weight 0: prompts are free
    assert free.admit("a").admitted
    with pytest.raises(ValueError, match="prompt_token_weight"):
        Limiter(LimitsConfig(prompt_token_weight=float("nan")))


@pytest.mark.parametrize("peer, xff, trusted, want", [
    ("ipv4:10.0.0.5:1234", "203.0.113.9", [], "10.0.0.5"),                        # no proxies trusted: the peer
    ("ipv4:10.0.0.5:1234", "203.0.113.9", ["10.0.0.0/8"], "203.0.113.9"),          # from Envoy: the client
    ("ipv4:10.0.0.5:1234", "6.6.6.6, 203.0.113.9", ["10.0.0.0/8"], "203.0.113.9"),  # a forged left entry: ignored
    ("ipv4:10.0.0.5:1234", "203.0.113.9, 10.0.0.7", ["10.0.0.0/8"], "203.0.113.9"),  # two proxy hops
    ("ipv4:192.0.2.1:1234", "203.0.113.9", ["10.0.0.0/8"], "192.0.2.1"),           # not from a proxy: the peer
    ("ipv6:[::1]:1234", "2001:db8::7", ["::1"], "2001:db8::7"),
    ("ipv4:10.0.0.5:1234", None, ["10.0.0.0/8"], "10.0.0.5"),
])
def test_client_address_believes_x_forwarded_for_only_from_trusted_proxies(peer, xff, trusted, want):
    from lawchat_server.limiter import client_address
    nets = LimitsConfig(trusted_proxies=trusted).networks()
    assert client_address(peer, xff, nets) == want
    with pytest.raises(ValueError, match="trusted_proxies"):
        LimitsConfig(trusted_proxies=["not-an-ip"]).validate()
