"""Prometheus metrics, in a registry owned by the app (not the process-global one)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mergegate_requests_total", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("mergegate_request_seconds", "HTTP request latency (until the body is sent)",
                                 ["route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.tokens = Counter("mergegate_tokens_total", "Tokens processed", ["model", "direction"],
                              registry=self.registry)
        self.loaded_models = Gauge("mergegate_loaded_models", "Models resident in memory", registry=self.registry)
        self.loaded_bytes = Gauge("mergegate_loaded_bytes", "Bytes of resident model weights", registry=self.registry)
        self.jobs = Counter("mergegate_jobs_total", "Jobs submitted", ["kind"], registry=self.registry)
        self._refreshers: list[Callable[[], None]] = []
        self._init_remote()

    def _init_remote(self) -> None:
        """Per remote expert: requests by outcome, errors by class, upstream time and the gateway's overhead."""
        r = self.registry
        self.remote_requests = Counter("mergegate_remote_requests_total", "Requests proxied to remote experts",
                                       ["expert", "outcome"], registry=r)
        self.remote_errors = Counter("mergegate_remote_errors_total", "Remote expert failures by class",
                                     ["expert", "error"], registry=r)
        self.remote_upstream = Histogram("mergegate_remote_upstream_seconds", "Upstream time (to the first event when "
                                         "streaming)", ["expert"], registry=r,
                                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.remote_overhead = Histogram("mergegate_remote_overhead_seconds", "Gateway time added to the upstream's",
                                         ["expert"], registry=r,
                                         buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5))
        self.remote_breaker = Gauge("mergegate_remote_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open",
                                    ["expert"], registry=r)

    def add_refresher(self, fn: Callable[[], None]) -> None:
        self._refreshers.append(fn)

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.tokens.labels(model, "in").inc(prompt)
        self.tokens.labels(model, "out").inc(completion)

    def render(self) -> bytes:
        for fn in self._refreshers:
            fn()
        return generate_latest(self.registry)
