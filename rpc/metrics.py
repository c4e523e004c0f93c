"""Prometheus metrics of the Generate server, served on their own HTTP port.

Counters and histograms are updated by the servicer as requests run; gauges are read from
`engine.stats()` at scrape time. The keys read from `stats()` (all optional, missing ones are
not exported): `waiting`, `running`, `pages_total`, `pages_free`, `prefix_hit_rate` (or
`prefix_cache_hit_rate`), and the speculative decoding keys `spec_<drafter>_<stat>` (see
`decode/scheduler.py`), exported with a `drafter` label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class _EngineGauges:
    """A collector that asks the engine for its gauges on every scrape."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        try:
            s = self.engine.stats()
        except Exception:  # a scrape must not fail because the engine is stopping
            return
        simple = {
            "waiting": ("pallax_queue_depth", "Requests waiting for admission."),
            "running": ("pallax_running_sequences", "Sequences admitted and decoding."),
            "pages_total": ("pallax_kv_pages_total", "KV cache pages in the pool."),
            "pages_free": ("pallax_kv_pages_free", "KV cache pages not held by any sequence."),
            "prefix_cache_hit_rate": ("pallax_prefix_cache_hit_rate", "Fraction of prompt tokens served from the prefix cache."),
        }
        if "prefix_cache_hit_rate" not in s and "prefix_hit_rate" in s:
            s = {**s, "prefix_cache_hit_rate": s["prefix_hit_rate"]}
        for key, (name, doc) in simple.items():
            if isinstance(s.get(key), (int, float)):
                yield GaugeMetricFamily(name, doc, value=float(s[key]))
        if s.get("pages_total"):
            used = 1.0 - float(s.get("pages_free", 0)) / float(s["pages_total"])
            yield GaugeMetricFamily("pallax_kv_page_utilization", "Fraction of KV pages in use.", value=used)
        yield from _speculative(s)


_SPEC = {  # stats() key suffix -> (metric, help, is a counter)
    "verifications": ("pallax_spec_verifications", "Speculative rows verified.", True),
    "draft_tokens": ("pallax_spec_draft_tokens", "Draft tokens proposed.", True),
    "accepted_tokens": ("pallax_spec_accepted_tokens", "Draft tokens accepted.", True),
    "empty_rounds": ("pallax_spec_empty_rounds", "Speculative rounds with nothing drafted.", True),
    "acceptance_rate": ("pallax_spec_acceptance_rate", "Draft tokens accepted per draft token proposed.", False),
    "mean_accepted_length": ("pallax_spec_mean_accepted_length", "Tokens a verification yields on average.", False),
}


def _speculative(stats: dict):
    """Per-drafter speculative decoding metrics from `spec_<drafter>_<stat>` keys."""
    for suffix, (name, doc, counter) in _SPEC.items():
        family = (CounterMetricFamily if counter else GaugeMetricFamily)(name, doc, labels=["drafter"])
        found = False
        for key, value in stats.items():
            if key.startswith("spec_") and key.endswith("_" + suffix) and isinstance(value, (int, float)):
                drafter = key[len("spec_"):-len(suffix) - 1]
                if drafter:  # spec_<suffix> itself is the total over drafters
                    family.add_metric([drafter], float(value))
                    found = True
        if found:
            yield family


class ServerMetrics:
    def __init__(self, engine, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("pallax_requests", "Generate requests that ran, by finish reason.",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("pallax_rpc_rejected", "RPCs refused before running, by gRPC status code.",
                                ["code"], registry=r)
        self.ttft = Histogram("pallax_time_to_first_token_seconds", "RPC start to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("pallax_time_per_output_token_seconds", "Time between output tokens after the first.",
                              buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("pallax_request_latency_seconds", "RPC start to last response.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens_in = Counter("pallax_prompt_tokens", "Prompt tokens of requests that ran.", registry=r)
        self.tokens_out = Counter("pallax_generation_tokens", "Tokens generated.", registry=r)
        self.in_flight = Gauge("pallax_rpcs_in_flight", "Generate RPCs being served.", registry=r)
        r.register(_EngineGauges(engine))
        self._http = None

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server (port 0 picks a free one); returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
