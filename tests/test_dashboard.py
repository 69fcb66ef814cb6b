"""deploy/grafana/lawchat.json: a Grafana dashboard whose PromQL names only metrics the server exports.
(tests/test_prometheus.py also runs every expression on a real Prometheus scraping a real server.)"""
from __future__ import annotations

import json
import re

from prometheus_client import generate_latest

from conftest import ROOT
from lawchat_server.breaker import Breaker, BreakerConfig
from lawchat_server.engine.engine import EngineStats
from lawchat_server.engine_slot import EngineSlot
from lawchat_server.metrics import Metrics

DASHBOARD = ROOT / "deploy" / "grafana" / "lawchat.json"
METRIC = re.compile(r"\blawchat_[a-z0-9_]+")


def dashboard_exprs() -> list[str]:
    d = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for p in d["panels"] for t in p["targets"]]


class StubEngine:
    running = waiting = 0

    def stats(self):
        return EngineStats(0, 0, 0, 0, 1, 0, 0, 0, 0)


def exported_names() -> set[str]:
    """Sample names the server's registry exposes (counters with _total, histograms with _bucket/_sum/_count)."""
    m = Metrics()
    slot = EngineSlot()
    slot.set(StubEngine(), "x")
    m.watch(slot, Breaker(BreakerConfig()))
    for label in ("OK",):
        m.requests.labels("Chat", label).inc()
    m.rate_limited.labels("client_requests").inc()
    m.degraded.labels("switch").inc()
    m.breaker_failures.labels("error").inc()
    m.finished.labels("eos").inc()
    text = generate_latest(m.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("lawchat_")}


def test_dashboard_is_grafana_shaped():
    d = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert d["title"] and d["uid"] and isinstance(d["schemaVersion"], int) and d["panels"]
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in d["templating"]["list"])
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        assert p["type"] in ("timeseries", "stat", "gauge") and p["title"]
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"]
        assert all(t["refId"] and t["expr"] for t in p["targets"])
    titles = " ".join(p["title"] for p in d["panels"]).lower()
    for topic in ("tokens/s", "first token", "inter-token", "end-to-end", "running", "errors", "breaker", "degraded"):
        assert topic in titles


def test_every_expression_names_only_exported_metrics():
    exported = exported_names()
    used = {name for e in dashboard_exprs() for name in METRIC.findall(e)}
    assert used and used <= exported, sorted(used - exported)
    for e in dashboard_exprs():                      # quantiles come from histogram buckets, per le
        if "histogram_quantile" in e:
            assert "_bucket" in e and "by (le)" in e
