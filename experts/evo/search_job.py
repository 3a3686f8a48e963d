"""Evo-Merging search runs: a search (:mod:`merging.search`) against a merge-session provider, with
progress, cancellation and the winner materialised.

A provider is where the weights live; the search only sends coefficients and reads losses:

* :class:`LocalProvider`: this gateway's :class:`~experts.evo.sessions.MergeSessionManager`, each
  evaluation one hop on the torch executor (so searches and completions share one OpenMP team);
* :class:`HttpProvider`: any server implementing the sessions contract (``/v1/merge/sessions``),
  e.g. another MergeGate, through :class:`~experts.evo.http.HttpEvaluator` (retries, timeouts).
  The client never holds weights.

:func:`run_search` opens a session whose query budget is the search's, runs the search, reports
progress (queries used, stage, best loss and coefficients so far, the loss-vs-queries series) and
closes the session. Materialising the winner is the caller's step (:meth:`Provider.materialize`), so
that a cancelled or failed search never registers anything. Same request and seed, same result, on
either provider: the session's loss is a pure function of (alpha, beta) and the optimisers are seeded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from experts.evo.http import EvaluationRejectedError, create_session, session_evaluator
from experts.evo.sessions import LossOptions, ValidationSpec
from experts.remote.redact import REDACTOR
from experts.remote.upstream import error_fields
from merging.search import SearchResult, Trial, run_method
from merging.search.settings import DEFAULTS, SearchSettings

__all__ = ["HttpProvider", "LocalProvider", "Provider", "SearchSpec", "run_search", "search_budget"]

MAX_POOL_QUERIES = 1024  # best_single over a tag selector: one query per adapter, at most a pool's size
MAX_SERIES = 20_000  # points kept in the loss-vs-queries series (the budgets are capped below this)


@dataclass(frozen=True)
class SearchSpec:
    """What to search and how: the provider's session-create body and the search's settings.

    ``session`` is the provider's session-create body: {base, pool, validation, loss}; its ``budget``
    is set here to the search's total budget. ``settings`` (the method and its arguments) are declared
    once in :class:`merging.search.settings.SearchSettings`.
    """

    session: Mapping[str, Any]
    settings: SearchSettings = DEFAULTS


def search_budget(spec: SearchSpec, n: int | None = None) -> int:
    """Queries the search may spend (a skipped Evo stage spends nothing); `n`: the pool's size, if known."""
    if not n and spec.settings.method == "best_single":
        pool = spec.session.get("pool")
        n = len(pool) if isinstance(pool, list | tuple) else MAX_POOL_QUERIES
    return spec.settings.queries(n or 0)


class Provider(Protocol):
    """Where the weights live: opens sessions, evaluates, materialises."""

    name: str

    def open(self, body: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        """(an :class:`merging.search.Evaluator` for a new session, the session's JSON view)."""
        ...

    def close(self, session_id: str) -> None: ...

    def materialize(self, session_id: str, alpha: Sequence[float], beta: Sequence[float], name: str, *,
                    tags: Sequence[str] = (), domain: str | None = None) -> dict[str, Any]: ...


class _OnExecutor:
    """An evaluator that runs each evaluation of a local session on the torch executor."""

    def __init__(self, session: Any, executor: Executor | None) -> None:
        self.session, self.executor, self.n = session, executor, session.n

    def evaluate(self, alpha: Sequence[float], beta: Sequence[float]) -> float:
        if self.executor is None:
            return self.session.evaluate(alpha, beta)
        return self.executor.submit(self.session.evaluate, alpha, beta).result()

    def evaluate_many(self, candidates: Sequence[tuple[Sequence[float], Sequence[float]]]) -> list[float]:
        """A generation as the session's batched run (what ``evaluate_batch`` over HTTP runs, so both
        providers give the same numbers), one batched forward per executor hop."""
        with self.session.population(candidates) as pop:
            while not pop.done:
                if self.executor is None:
                    pop.step()
                else:
                    self.executor.submit(pop.step).result()
            return pop.losses()


def session_args(body: Mapping[str, Any]) -> tuple[str, Any, Any, Any, int]:
    """(base, pool, ValidationSpec, LossOptions, budget) from a session-create body (already
    validated at the boundary: ``app.protocol.merge_sessions.SessionCreateRequest``)."""
    v, lo = dict(body["validation"]), dict(body.get("loss") or {})
    examples = v.get("examples")
    validation = ValidationSpec(examples=None if examples is None else tuple(dict(e) for e in examples),
                                corpus=v.get("corpus"), task=v.get("task"), split=v.get("split", "validation"),
                                max_examples=v.get("max_examples"))
    loss = LossOptions(**{k: lo[k] for k in ("max_examples", "max_tokens_per_example", "append_eos") if k in lo})
    return body["base"], body["pool"], validation, loss, int(body.get("budget", 2000))


class LocalProvider:
    """This gateway's merge sessions (no HTTP)."""

    name = "local"

    def __init__(self, manager: Any, executor: Executor | None = None) -> None:
        self.manager, self.executor = manager, executor

    def open(self, body: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        base, pool, validation, loss, budget = session_args(body)

        def create() -> Any:
            return self.manager.create(base, pool, validation, loss=loss, budget=budget)

        session = create() if self.executor is None else self.executor.submit(create).result()
        return _OnExecutor(session, self.executor), session.view()

    def close(self, session_id: str) -> None:
        try:
            self.manager.delete(session_id)
        except KeyError:
            pass

    def materialize(self, session_id: str, alpha: Sequence[float], beta: Sequence[float], name: str, *,
                    tags: Sequence[str] = (), domain: str | None = None,
                    extra_lineage: Mapping[str, Any] | None = None) -> dict[str, Any]:
        def run() -> Any:
            return self.manager.materialize(session_id, alpha, beta, name, tags=tags, domain=domain,
                                            extra_lineage=extra_lineage)

        record = run() if self.executor is None else self.executor.submit(run).result()
        return {"id": record.id, "kind": record.kind, "lineage": record.lineage}


class HttpProvider:
    """A merge-session provider behind a URL (the true black-box case)."""

    def __init__(self, url: str, api_key: str | None = None, *, admin_key: str | None = None, timeout: float = 120.0,
                 retries: int = 4, **evaluator_kw: Any) -> None:
        self.url, self.api_key, self.timeout, self.retries = url.rstrip("/"), api_key, timeout, retries
        self.admin_key = admin_key  # materialising is an admin right on the provider; api_key if not given
        REDACTOR.add(api_key, admin_key)  # a provider key: never in an error, a job row or a log line
        self.evaluator_kw = evaluator_kw
        self.name = self.url

    def open(self, body: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        view = create_session(self.url, self.api_key, body, timeout=max(self.timeout, 300.0))
        ev = session_evaluator(self.url, self.api_key, view, timeout=self.timeout, retries=self.retries,
                               **self.evaluator_kw)
        return ev, view

    def _request(self, method: str, path: str, body: Mapping[str, Any] | None = None, *,
                 key: str | None = None) -> Any:
        key = key or self.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.request(method, self.url + path, json=body, headers=headers, timeout=max(self.timeout, 300.0))
        if not 200 <= r.status_code < 300:  # a redirect is refused too: its target is not this provider
            message = error_fields(r.content).get("message", "")
            raise EvaluationRejectedError(REDACTOR.redact(f"{method} {self.url}{path}: {r.status_code}: {message}"),
                                          status=r.status_code)
        try:
            return REDACTOR.redact_obj(r.json())
        except (ValueError, RecursionError):
            raise EvaluationRejectedError(f"{method} {self.url}{path}: {r.status_code} with a body that is not "
                                          "JSON", status=r.status_code) from None

    def close(self, session_id: str) -> None:
        try:
            self._request("DELETE", f"/v1/merge/sessions/{session_id}")
        except Exception:  # best effort: the provider expires idle sessions anyway
            pass

    def materialize(self, session_id: str, alpha: Sequence[float], beta: Sequence[float], name: str, *,
                    tags: Sequence[str] = (), domain: str | None = None) -> dict[str, Any]:
        body = {"alpha": [float(a) for a in alpha], "beta": [float(b) for b in beta], "name": name,
                "tags": list(tags), "domain": domain}
        return self._request("POST", f"/v1/merge/sessions/{session_id}/materialize", body, key=self.admin_key)


@dataclass
class Progress:
    """The live state of a search, as reported to the job (``detail``) and the CLI."""

    total: int
    stage: str | None = None
    queries: int = 0
    best_loss: float | None = None
    best_objective: float | None = None
    best_alpha: list[float] | None = None
    best_beta: list[float] | None = None
    series: dict[str, list[Any]] = field(default_factory=lambda: {"query": [], "loss": [], "best_loss": []})
    session: dict[str, Any] | None = None
    started: float = field(default_factory=time.monotonic)

    def add(self, t: Trial) -> None:
        self.stage, self.queries = t.stage, t.index + 1
        self.best_loss, self.best_objective = _finite(t.best_loss), _finite(t.best_objective)
        self.best_alpha, self.best_beta = list(t.best_alpha), list(t.best_beta)
        if len(self.series["query"]) < MAX_SERIES:
            for key, value in (("query", t.index + 1), ("loss", _finite(t.loss)), ("best_loss", self.best_loss)):
                self.series[key].append(value)

    @property
    def fraction(self) -> float:
        return self.queries / self.total if self.total else 0.0

    def message(self) -> str:
        best = "-" if self.best_loss is None else f"{self.best_loss:.4f}"
        return f"{self.stage or 'opening session'}: {self.queries}/{self.total} queries, best loss {best}"

    def detail(self) -> dict[str, Any]:
        return {"stage": self.stage, "queries_used": self.queries, "queries_total": self.total,
                "best_loss": self.best_loss, "best_objective": self.best_objective,
                "best_alpha": self.best_alpha, "best_beta": self.best_beta,
                "elapsed_s": round(time.monotonic() - self.started, 3), "session": self.session,
                "series": self.series}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def run_search(provider: Provider, spec: SearchSpec, *,
               on_progress: Callable[[Progress, bool], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> tuple[SearchResult, dict[str, Any]]:
    """Open a session, search, close it; returns (the search result, the session's view).

    ``on_progress(progress, force)`` is called after the session opens and after every query
    (``force`` marks events worth writing at once: the session opened, a new stage). On success the
    session is left open so that the caller can materialise the winner through it; the caller closes
    it (``provider.close(view["id"])``). On an error the session is closed here.
    """
    total = search_budget(spec)
    body = {**spec.session, "budget": max(total, 1) + 1}  # + 1: materialising the winner is one more query
    progress = Progress(total)
    evaluator, view = provider.open(body)
    progress.session = {"id": view.get("id"), "n": view.get("n"), "experts": view.get("experts")}
    if on_progress is not None:
        on_progress(progress, True)

    def on_trial(t: Trial) -> None:
        stage_changed = t.stage != progress.stage
        progress.add(t)
        if on_progress is not None:
            on_progress(progress, stage_changed)

    n = int(view.get("n") or len(view.get("experts") or []))
    progress.total = search_budget(spec, n)
    try:
        result = run_method(evaluator, n, spec.settings, on_trial=on_trial, should_stop=should_stop)
    except BaseException:
        provider.close(str(view.get("id")))
        raise
    finally:
        close = getattr(evaluator, "close", None)
        if close is not None:
            close()
    return result, view
