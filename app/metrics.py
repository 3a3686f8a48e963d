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

    def add_refresher(self, fn: Callable[[], None]) -> None:
        self._refreshers.append(fn)

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.tokens.labels(model, "in").inc(prompt)
        self.tokens.labels(model, "out").inc(completion)

    def render(self) -> bytes:
        for fn in self._refreshers:
            fn()
        return generate_latest(self.registry)
