"""metrics: Prometheus metrics under the lawchat_ prefix (vLLM-style names), served on /metrics."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 4000, 8000, 16000, 32000)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("lawchat_requests", "Finished RPCs by method and gRPC status code.",
                                ["method", "code"], registry=r)
        self.finished = Counter("lawchat_request_success", "Generations that ended normally, by finish reason.",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("lawchat_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("lawchat_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("lawchat_time_to_first_token_seconds", "Time from request to first text delta.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lawchat_inter_token_latency_seconds", "Time between streamed deltas.",
                             buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("lawchat_e2e_request_latency_seconds", "Time from request to final message.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("lawchat_request_queue_time_seconds", "Time a request waited in the engine's "
                                    "queue before its prompt was first scheduled.", buckets=LATENCY_BUCKETS, registry=r)
        self.request_prompt_tokens = Histogram("lawchat_request_prompt_tokens", "Prompt tokens of finished requests.",
                                               buckets=COUNT_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram("lawchat_request_generation_tokens", "Generated tokens of finished "
                                                   "requests.", buckets=COUNT_BUCKETS, registry=r)
        self.retrieval_seconds = Histogram("lawchat_retrieval_seconds", "Time to find a request's articles (the "
                                           "search runs off the event loop).", buckets=TOKEN_BUCKETS, registry=r)
        self.encoder_seconds = Histogram("lawchat_encoder_seconds", "Time the retrieval encoder took to embed a "
                                         "question (or documents being added).", buckets=TOKEN_BUCKETS, registry=r)
        self.reranker_seconds = Histogram("lawchat_reranker_seconds", "Time the retrieval cross-encoder took to "
                                          "re-score a question's candidates.", buckets=TOKEN_BUCKETS, registry=r)
        self.retrieval_failures = Counter("lawchat_retrieval_failures", "Requests refused because the retrieval "
                                          "backend (a search cluster) did not answer.", registry=r)
        self.no_article = Counter("lawchat_retrieval_no_article", "Requests with retrieval on whose answer cites no "
                                  "article: none cleared retrieval.min_confidence.", registry=r)
        self.running = Gauge("lawchat_requests_running", "Requests being generated now.", registry=r)
        self.waiting = Gauge("lawchat_requests_waiting", "Requests queued for the engine.", registry=r)
        self.admitted = Counter("lawchat_limiter_admitted", "Requests let through by the rate limiter.", registry=r)
        self.rate_limited = Counter("lawchat_limiter_rejected", "Requests refused by a token bucket, by bucket.",
                                    ["reason"], registry=r)
        self.degraded = Counter("lawchat_degraded_responses", "Canned answers sent instead of the model's, by cause "
                                "(breaker_open, switch).", ["reason"], registry=r)
        self.breaker_failures = Counter("lawchat_breaker_failures", "Engine failures counted by the circuit breaker "
                                        "(error, stalled, engine_gone).", ["kind"], registry=r)
        self.breaker_state = Gauge("lawchat_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.",
                                   registry=r)
        self.degraded_switch = Gauge("lawchat_degraded_switch", "1 while the manual degraded switch is on.",
                                     registry=r)
        self.draining = Gauge("lawchat_draining", "1 once a Drain has started.", registry=r)

    def watch(self, slot, breaker) -> None:
        """Gauges read at scrape time from the engine slot (whichever engine serves now) and the breaker."""
        from .breaker import STATES
        self.running.set_function(lambda: slot.engine.running if slot.engine else 0)
        self.waiting.set_function(lambda: slot.engine.waiting if slot.engine else 0)
        self.breaker_state.set_function(lambda: STATES.index(breaker.state))
        self.degraded_switch.set_function(lambda: float(breaker.switch_on))
        self.draining.set_function(lambda: float(slot.draining))
        self.registry.register(EngineCollector(slot))

    def serve_http(self, host: str, port: int):
        """Start /metrics in a daemon thread; -> (http server, thread). Port 0 picks a free port."""
        return start_http_server(port, addr=host, registry=self.registry)


class EngineCollector:
    """Engine facts read at scrape time: batch, KV cache, prefix cache, preemptions."""

    def __init__(self, slot):
        self.slot = slot

    def describe(self):
        return []

    def collect(self):
        if self.slot.engine is None:      # still loading
            return
        st = self.slot.engine.stats()
        yield GaugeMetricFamily("lawchat_batch_size", "Sequences in the last engine step.", value=st.batch_size)
        yield GaugeMetricFamily("lawchat_kv_cache_blocks_used", "KV-cache blocks held by sequences.",
                                value=st.kv_blocks_used)
        yield GaugeMetricFamily("lawchat_kv_cache_blocks_total", "KV-cache blocks in all.", value=st.kv_blocks_total)
        yield GaugeMetricFamily("lawchat_kv_cache_usage_ratio", "Share of KV-cache blocks in use.",
                                value=st.kv_blocks_used / st.kv_blocks_total if st.kv_blocks_total else 0.0)
        yield CounterMetricFamily("lawchat_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  value=st.prefix_cache_queries)
        yield CounterMetricFamily("lawchat_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  value=st.prefix_cache_hits)
        yield CounterMetricFamily("lawchat_preemptions", "Sequences preempted (KV cache full) to be recomputed.",
                                  value=st.preemptions)
        yield CounterMetricFamily("lawchat_engine_steps", "Engine steps (one forward pass each).", value=st.steps)
        if st.adapters:   # one label value per adapter served (names come from the operator, never from a request)
            requests = CounterMetricFamily("lawchat_adapter_requests", "Requests that asked for each LoRA adapter "
                                           "since it was loaded.", labels=["adapter"])
            running = GaugeMetricFamily("lawchat_adapter_running", "Sequences generating on each LoRA adapter.",
                                        labels=["adapter"])
            on_device = GaugeMetricFamily("lawchat_adapter_on_device", "1 while the adapter holds an engine slot.",
                                          labels=["adapter"])
            for a in st.adapters:
                requests.add_metric([a["name"]], a["requests"])
                running.add_metric([a["name"]], a["running"])
                on_device.add_metric([a["name"]], float(a["on_device"]))
            yield requests
            yield running
            yield on_device
