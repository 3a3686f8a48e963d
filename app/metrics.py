"""Prometheus metrics, in a registry owned by the app (not the process-global one)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
        self._init_engine()

    def _init_engine(self) -> None:
        """The batching engine, per model: rows decoding, prompts waiting, time in queue, tokens."""
        r = self.registry
        self.engine_batch = Gauge("mergegate_engine_batch_rows", "Rows (choices) decoding in the model's batch",
                                  ["model"], registry=r)
        self.engine_queue = Gauge("mergegate_engine_queue_prompts", "Prompts waiting for a place in the batch",
                                  ["model"], registry=r)
        self.engine_wait = Histogram("mergegate_engine_queue_seconds", "Time from submission to the start of the "
                                     "prefill", ["model"], registry=r,
                                     buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.engine_tokens = Counter("mergegate_engine_generated_tokens_total", "Tokens sampled by the engine "
                                     "(rate() of it is tokens/s)", ["model"], registry=r)
        self.engine_prefill = Counter("mergegate_engine_prefill_tokens_total", "Prompt tokens run through the "
                                      "model (padding included)", ["model"], registry=r)
        self.engine_steps = Counter("mergegate_engine_steps_total", "Engine iterations", ["model"], registry=r)
        self._engine_series: dict[str, tuple[Any, ...]] = {}
        self.adapter_entries = Gauge("mergegate_adapter_cache_adapters", "LoRA adapters (and request-time mixes) "
                                     "resident for serving on their bases", registry=r)
        self.adapter_bytes = Gauge("mergegate_adapter_cache_bytes", "Bytes of resident LoRA factors", registry=r)
        self.adapter_hits = Gauge("mergegate_adapter_cache_hits", "Adapter cache hits since start", registry=r)
        self.adapter_misses = Gauge("mergegate_adapter_cache_misses", "Adapter cache misses (loads) since start",
                                    registry=r)

    def set_adapter_cache(self, stats: dict[str, int]) -> None:
        self.adapter_entries.set(stats["adapters"])
        self.adapter_bytes.set(stats["bytes"])
        self.adapter_hits.set(stats["hits"])
        self.adapter_misses.set(stats["misses"])

    # -- experts.hf.engine.engine.Observer --------------------------------------------------------
    def admitted(self, model: str, waited_s: float) -> None:
        self.engine_wait.labels(model).observe(waited_s)

    def stepped(self, model: str, stats: Any, running: int, waiting: int) -> None:
        series = self._engine_series.get(model)
        if series is None:  # labels() costs a lookup and a lock: once per model, not once per step
            series = self._engine_series[model] = tuple(m.labels(model) for m in (
                self.engine_batch, self.engine_queue, self.engine_steps, self.engine_tokens, self.engine_prefill))
        batch, queue, steps, tokens, prefill = series
        batch.set(running)
        queue.set(waiting)
        steps.inc()
        if stats.generated:
            tokens.inc(stats.generated)
        if stats.prefill_tokens:
            prefill.inc(stats.prefill_tokens)

    def forget_model(self, model: str) -> None:
        """A deleted expert's series leave /metrics (engine, tokens and remote series: the id is the first label)."""
        self._engine_series.pop(model, None)
        for metric in (self.engine_batch, self.engine_queue, self.engine_wait, self.engine_tokens,
                       self.engine_prefill, self.engine_steps, self.tokens, self.remote_requests,
                       self.remote_errors, self.remote_upstream, self.remote_overhead, self.remote_breaker):
            for labels in list(metric._metrics):
                if labels and labels[0] == model:
                    metric.remove(*labels)

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
