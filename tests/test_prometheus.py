"""A real Prometheus server (Debian package `prometheus`) scrapes the lawchat server's /metrics."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from lawchat_client import LawchatClient, NO_RETRY

pytestmark = pytest.mark.slow
PROMETHEUS = shutil.which("prometheus")

if PROMETHEUS is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI needs the prometheus binary: .ci/run installs Debian's prometheus")
    pytest.skip("prometheus not installed (apt-get install prometheus); CI installs it", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(port: int, promql: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())["data"]["result"]


def test_prometheus_scrapes_lawchat_metrics(server, tmp_path):
    metrics_hostport = server.metrics_url.removeprefix("http://").removesuffix("/metrics")
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: lawchat\n    static_configs:\n"
        f"      - targets: ['{metrics_hostport}']\n")
    port = free_port()
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prom.log").open("w"))
    try:
        with LawchatClient(server.target, timeout=60, retry=NO_RETRY) as c:
            n = c.chat("劳动合同法第三十九条是怎么规定的？", max_new_tokens=9).completion_tokens
        deadline, up, tokens = time.monotonic() + 60, [], []
        while time.monotonic() < deadline:
            try:
                up = query(port, 'up{job="lawchat"}')
                tokens = query(port, "lawchat_generation_tokens_total")
            except OSError:
                pass
            if up and tokens and float(tokens[0]["value"][1]) >= n:
                break
            time.sleep(0.5)
        assert up and up[0]["value"][1] == "1", (tmp_path / "prom.log").read_text()[-2000:]
        assert tokens and float(tokens[0]["value"][1]) >= n
        ok = query(port, 'lawchat_requests_total{method="Chat",code="OK"}')
        assert ok and float(ok[0]["value"][1]) >= 1

        # traffic across several scrapes, then every Grafana dashboard expression runs (a PromQL parse error is
        # HTTP 400) and the throughput and TTFT panels show numbers
        from test_dashboard import dashboard_exprs
        with LawchatClient(server.target, timeout=60, retry=NO_RETRY) as c:
            for _ in range(4):
                c.chat("试用期最长多久？", max_new_tokens=6, ignore_eos=True)
                time.sleep(1.2)
        time.sleep(2.5)
        for expr in dashboard_exprs():
            query(port, expr)
        rate = query(port, "sum(rate(lawchat_generation_tokens_total[1m]))")
        assert rate and float(rate[0]["value"][1]) > 0
        ttft = query(port, "histogram_quantile(0.99, sum by (le) (rate(lawchat_time_to_first_token_seconds_bucket[5m])))")
        assert ttft and 0 < float(ttft[0]["value"][1]) < 60
    finally:
        prom.terminate()
        prom.wait(30)
