"""Search a black-box ensemble's weights on validation data: every API call once, then pure numpy.

1. `collect(ensemble, examples, objective=...)` makes all the calls and returns a `ScoreTable`.
   Examples: {"prompt", "completion"} (the completion is the reference; only its tokens count) or,
   for token_mix only, {"text"} (every token but the first).
   - token_mix: every member scores every example (remote: completions with echo + logprobs; local:
     a forward pass), giving log p_j(t | reference prefix) per reference token t. members x examples calls.
   - score_select: each candidate member generates one greedy answer per prompt (temperature 0,
     `max_tokens`, `stop`); every member scores every distinct non-empty text among the answers and
     the reference (length-normalised log-likelihood l_j, as the ensemble does).
     generators x examples + members x distinct texts calls.
2. `EnsembleWeightsEvaluator(table)`: the merging.search Evaluator; loss(w) with w = beta / sum(beta).
   An all-zero (or negative, or non-finite) beta scores +inf, which the runner ranks last. No calls.
3. `search_ensemble_weights(table, ...)` runs `merging.search.weight_search` on it;
   `new_weights(result, table)` gives {member id: weight}.

Objectives (lower is better):

- token_mix "loss": mean over all reference tokens (pooled across examples) of -log sum_j w_j p_j(t).
  The served rule (`maths.mix`) restricts each step to the union U of the members' top-k and
  renormalises each member over U: m(t) = sum_j w_j p_j(t) / Z_j, Z_j = sum_{u in U} p_j(u) (a remote
  member's p_j is 0 outside its own top-k), and m = 0 outside U. The two agree when U covers the
  vocabulary (every Z_j = 1). With a small k, Z_j < 1 boosts the tokens in U, and a reference token
  outside U would cost +inf. So this is the loss of the full mixture that token_mix approximates,
  computed exactly from one echo call per member and example (the served rule would need every
  member's top-k at every position, and a local member's probabilities of the others' top-k).
- score_select: S_w(x) = sum_j w_j l_j(x) / sum_j w_j over the members with w_j > 0 that could score x
  (`maths.weighted_score`); the selected answer is the argmax over the candidates (ties: the earlier),
  which is what the served ensemble picks for a temperature-0 request with the same max_tokens and stop.
  "accuracy": 1 - mean exact match (both stripped) of the selected answer and the reference.
  "f1": 1 - mean token F1 (whitespace tokens, case-sensitive) of the selected answer.
  "loss" (smooth): mean over examples of -log softmax(S_w(reference), S_w(c) for each distinct wrong
  candidate c)[reference]. That is the cross-entropy of picking the reference from itself and the
  wrong answers, with the ensemble's own score as logits; exp(S) is a geometric-mean per-token
  probability, so the temperature is 1 in those units. It is 0 when every candidate is right, and
  +inf under weights where no member with a weight can score the reference.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal

import anyio
import numpy as np
import numpy.typing as npt

from experts.base import GenerationParams
from experts.blackbox.ensemble import BlackBoxEnsemble, Member, gather
from experts.blackbox.maths import mean_logprob
from experts.blackbox.members import Ledger
from experts.blackbox.spec import BlackBoxSpec
from experts.errors import ExpertError, GenerationInputError
from merging.search import SearchResult, Trial, weight_search

Objective = Literal["loss", "accuracy", "f1"]
OBJECTIVES: dict[str, tuple[str, ...]] = {"token_mix": ("loss",), "score_select": ("accuracy", "f1", "loss")}
DEFAULT_OBJECTIVE: dict[str, Objective] = {"token_mix": "loss", "score_select": "accuracy"}
NEG_INF = -math.inf
FloatArray = npt.NDArray[np.float64]


class WeightSearchInputError(ExpertError, ValueError):
    """Examples, objective or table that cannot be searched (400)."""


@dataclass(frozen=True, slots=True)
class TokenRow:
    prompt: str
    reference: str
    logprobs: tuple[tuple[float, ...], ...]  # per member: log p_j of each reference token


@dataclass(frozen=True, slots=True)
class SelectRow:
    prompt: str
    reference: str
    generators: tuple[str, ...]  # the member that generated each candidate
    texts: tuple[str, ...]
    scores: tuple[tuple[float | None, ...], ...]  # per candidate, per member: l_j (None: not scored)
    reference_scores: tuple[float | None, ...]


@dataclass(frozen=True, slots=True)
class ScoreTable:
    ensemble: str
    mode: str
    members: tuple[str, ...]
    weights: tuple[float, ...]  # the ensemble's weights when collected
    objective: str  # the default for evaluators of this table
    rows: tuple[TokenRow | SelectRow, ...]
    usage: dict[str, Any] = field(default_factory=dict)  # Ledger: calls and tokens, in total and per member
    settings: dict[str, Any] = field(default_factory=dict)  # collect's arguments

    @property
    def calls(self) -> int:
        return int(self.usage.get("calls", 0))

    def summary(self) -> dict[str, Any]:
        tokens = sum(len(r.logprobs[0]) for r in self.rows if isinstance(r, TokenRow))
        return {"ensemble": self.ensemble, "mode": self.mode, "members": list(self.members),
                "weights": list(self.weights), "objective": self.objective, "examples": len(self.rows),
                "tokens": tokens, "usage": self.usage, "collect": self.settings}


# -- collect: all the API calls --------------------------------------------------------------------
def _pairs(examples: Sequence[Mapping[str, Any]], mode: str) -> list[tuple[str, str]]:
    out = []
    for i, ex in enumerate(examples):
        if isinstance(ex.get("completion"), str) and isinstance(ex.get("prompt"), str):
            pair = (ex["prompt"], ex["completion"])
        elif isinstance(ex.get("text"), str) and mode == "token_mix":
            pair = ("", ex["text"])
        else:
            need = "{prompt, completion}" + (" or {text}" if mode == "token_mix" else "")
            raise WeightSearchInputError(f"example {i}: {mode} needs {need} strings")
        if not pair[1]:
            raise WeightSearchInputError(f"example {i}: the reference text is empty")
        out.append(pair)
    if not out:
        raise WeightSearchInputError("no examples")
    return out


async def _bounded(calls: Sequence[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    """The calls' results in order, at most `limit` in flight; the first failure cancels the rest."""
    sem = anyio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[Any]]) -> Any:
        async with sem:
            return await call()

    return await gather([partial(one, c) for c in calls]) if calls else []


async def _score(member: Member, prompt: str, text: str, ledger: Ledger) -> float | None:
    try:
        return mean_logprob(await member.score(prompt, text, ledger))
    except GenerationInputError:  # this member cannot score this text (e.g. over its context), as when served
        return None


async def collect(ensemble: BlackBoxEnsemble, examples: Sequence[Mapping[str, Any]], *,
                  objective: Objective | None = None, max_tokens: int = 32, stop: Sequence[str] = (),
                  concurrency: int = 8) -> ScoreTable:
    """Make every call the search needs, once (see the module docstring); errors propagate."""
    mode = ensemble.mode
    objective = objective or DEFAULT_OBJECTIVE[mode]
    _check_objective(mode, objective)
    if max_tokens < 1 or concurrency < 1:
        raise WeightSearchInputError("max_tokens and concurrency must be >= 1")
    pairs = _pairs(examples, mode)
    members, ledger = ensemble.members, Ledger()
    if mode == "token_mix":
        rows: list[TokenRow | SelectRow] = list(await _collect_tokens(members, pairs, ledger, concurrency))
        settings: dict[str, Any] = {"concurrency": concurrency}
    else:
        gens = [ensemble.member(c) for c in ensemble.spec.candidates]
        rows = list(await _collect_select(members, gens, pairs, ledger, max_tokens, tuple(stop), concurrency))
        settings = {"max_tokens": max_tokens, "stop": list(stop), "temperature": 0, "concurrency": concurrency}
    usage = {**ledger.totals(), "members": ledger.members}
    ids, weights = tuple(m.id for m in members), tuple(m.weight for m in members)
    return ScoreTable(ensemble.id, mode, ids, weights, objective, tuple(rows), usage, settings)


async def _collect_tokens(members: list[Member], pairs: list[tuple[str, str]], ledger: Ledger,
                          limit: int) -> list[TokenRow]:
    jobs = [(p, t, m) for p, t in pairs for m in members]
    values = await _bounded([partial(m.score, p, t, ledger) for p, t, m in jobs], limit)
    rows, k = [], len(members)
    for i, (prompt, text) in enumerate(pairs):
        per = tuple(tuple(float(v) for v in vs) for vs in values[i * k:(i + 1) * k])
        if len({len(v) for v in per}) != 1:
            counts = {m.id: len(v) for m, v in zip(members, per)}
            raise WeightSearchInputError(f"example {i}: the members tokenise the reference differently "
                                         f"{counts}; token_mix needs one shared tokenizer")
        rows.append(TokenRow(prompt, text, per))
    if not any(r.logprobs[0] for r in rows):
        raise WeightSearchInputError("no reference token could be scored (texts of one token?)")
    return rows


async def _collect_select(members: list[Member], gens: list[Member], pairs: list[tuple[str, str]],
                          ledger: Ledger, max_tokens: int, stop: tuple[str, ...], limit: int
                          ) -> list[SelectRow]:
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0, stop=stop)
    extra = {"stop": list(stop)} if stop else {}  # the request the served ensemble would forward
    bodies = [{"prompt": p, "max_tokens": max_tokens, "temperature": 0, **extra} for p, _ in pairs]
    cands = await _bounded([partial(g.generate, pairs[i][0], params, bodies[i], ledger)
                            for i in range(len(pairs)) for g in gens], limit)
    texts = [[c.text for c in cands[i * len(gens):(i + 1) * len(gens)]] for i in range(len(pairs))]
    distinct = [[t for t in dict.fromkeys([*ts, ref]) if t] for ts, (_, ref) in zip(texts, pairs)]
    jobs = [(i, t, m) for i, ts in enumerate(distinct) for t in ts for m in members]
    values = await _bounded([partial(_score, m, pairs[i][0], t, ledger) for i, t, m in jobs], limit)
    scored: dict[tuple[int, str], list[float | None]] = {}
    for (i, t, _), v in zip(jobs, values):
        scored.setdefault((i, t), []).append(v)
    none = tuple(None for _ in members)
    return [SelectRow(prompt, ref, tuple(g.id for g in gens), tuple(texts[i]),
                      tuple(tuple(scored.get((i, t), none)) for t in texts[i]), tuple(scored[(i, ref)]))
            for i, (prompt, ref) in enumerate(pairs)]


# -- the evaluator: no calls ------------------------------------------------------------------------
def _check_objective(mode: str, objective: str) -> None:
    if objective not in OBJECTIVES.get(mode, ()):
        raise WeightSearchInputError(f"objective {objective!r} is not defined for {mode}; "
                                     f"choose one of {list(OBJECTIVES.get(mode, ()))}")


def exact_match(a: str, b: str) -> float:
    return float(a.strip() == b.strip())


def token_f1(prediction: str, reference: str) -> float:
    p, r = prediction.split(), reference.split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    return 0.0 if common == 0 else 2 * common / (len(p) + len(r))


def _weighted(scores: FloatArray, w: FloatArray) -> FloatArray:
    """S_w over the last axis (members): NaN = not scored; -inf where no member with a weight scored."""
    ok = ~np.isnan(scores) & (w > 0)
    with np.errstate(invalid="ignore"):
        num = np.where(ok, scores * w, 0.0).sum(-1)
    den = np.where(ok, w, 0.0).sum(-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), NEG_INF)


def _logsumexp(z: FloatArray, axis: int) -> FloatArray:
    m = z.max(axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out: FloatArray = np.squeeze(m, axis) + np.log(np.exp(z - m).sum(axis=axis))
    return out


class EnsembleWeightsEvaluator:
    """merging.search Evaluator over a ScoreTable: `evaluate(alpha, beta)` = loss(beta); alpha is unused."""

    def __init__(self, table: ScoreTable, objective: Objective | None = None) -> None:
        self.table, self.objective = table, objective or table.objective
        _check_objective(table.mode, self.objective)
        self.n = len(table.members)
        if table.mode == "token_mix":
            self._lp = np.concatenate([np.asarray(r.logprobs, dtype=np.float64).reshape(self.n, -1).T
                                       for r in table.rows if isinstance(r, TokenRow)])  # (T, M)
            return
        rows = [r for r in table.rows if isinstance(r, SelectRow)]
        e, c = len(rows), max(len(r.texts) for r in rows)
        self._cand = np.full((e, c, self.n), np.nan)  # (E, C, M); padding rows stay NaN (S = -inf)
        self._em, self._f1, self._wrong = np.zeros((e, c)), np.zeros((e, c)), np.zeros((e, c), dtype=bool)
        self._ref = np.array([[np.nan if v is None else v for v in r.reference_scores] for r in rows])  # (E, M)
        for i, r in enumerate(rows):
            for j, (text, s) in enumerate(zip(r.texts, r.scores)):
                self._cand[i, j] = [np.nan if v is None else v for v in s]
                self._em[i, j], self._f1[i, j] = exact_match(text, r.reference), token_f1(text, r.reference)
                self._wrong[i, j] = not self._em[i, j] and text not in r.texts[:j]  # each wrong text once

    def weights(self, beta: Sequence[float]) -> FloatArray | None:
        """beta normalised to sum 1; None when it is not a usable weight vector (all zero, negative, ...)."""
        w = np.asarray(beta, dtype=np.float64)
        if w.shape != (self.n,):
            raise ValueError(f"{self.n} members but {w.shape} weights")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            return None
        out: FloatArray = w / w.sum()
        return out

    def selected(self, beta: Sequence[float]) -> list[int]:
        """score_select: the index of the selected candidate of each example."""
        w = self.weights(beta)
        if w is None or self.table.mode != "score_select":
            raise ValueError("selected() needs a score_select table and usable weights")
        return [int(i) for i in _weighted(self._cand, w).argmax(axis=1)]

    def loss(self, beta: Sequence[float]) -> float:
        w = self.weights(beta)
        if w is None:
            return math.inf
        if self.table.mode == "token_mix":
            with np.errstate(divide="ignore"):
                return float(-_logsumexp(self._lp + np.log(w), axis=1).mean())
        s = _weighted(self._cand, w)  # (E, C)
        if self.objective != "loss":
            pick = s.argmax(axis=1)
            hits = self._em if self.objective == "accuracy" else self._f1
            return float(1.0 - hits[np.arange(len(pick)), pick].mean())
        ref = _weighted(self._ref, w)  # (E,)
        wrong = _logsumexp(np.where(self._wrong, s, NEG_INF), axis=1)
        known = np.isfinite(ref)
        per = np.where(known, np.logaddexp(ref, wrong) - np.where(known, ref, 0.0), math.inf)
        return float(per.mean())

    def evaluate(self, alpha: Sequence[float], beta: Sequence[float]) -> float:
        return self.loss(beta)


# -- the search and its result -------------------------------------------------------------------------
def search_ensemble_weights(table: ScoreTable, *, objective: Objective | None = None, method: str = "CMA",
                            budget: int = 100, seed: int | None = 42, popsize: int = 10, sigma0: float = 0.1,
                            l1: float = 0.0, start: Literal["uniform", "current"] = "uniform",
                            early_stop: int | None = None, on_trial: Callable[[Trial], None] | None = None,
                            should_stop: Callable[[], bool] | None = None) -> SearchResult:
    """Weights for `table`'s members: `weight_search` on `EnsembleWeightsEvaluator(table, objective)`.

    `method` is the optimiser ("CMA" or a nevergrad name); `start` "current" starts from the weights
    the ensemble had when collected. The result's settings add the objective, the table's summary and
    the losses at the current and uniform weights (a baseline to compare `result.loss` with)."""
    ev = EnsembleWeightsEvaluator(table, objective)
    x0 = list(table.weights) if start == "current" else None
    result = weight_search(ev, ev.n, budget=budget, optimizer=method, popsize=popsize, sigma0=sigma0, l1=l1,
                           seed=seed, start=x0, early_stop=early_stop, on_trial=on_trial,
                           should_stop=should_stop)
    baseline = {"current": ev.loss(table.weights), "uniform": ev.loss([1.0] * ev.n)}
    extra = {"objective": ev.objective, "start_from": start, "table": table.summary(),
             "baseline_loss": baseline}
    return replace(result, settings={**result.settings, **extra})


def new_weights(result: SearchResult, table: ScoreTable) -> dict[str, float]:
    """{member id: weight}, normalised to sum 1, from a search on `table`."""
    w = np.asarray(result.beta, dtype=np.float64)
    if w.shape != (len(table.members),) or not np.all(w >= 0) or w.sum() <= 0:
        raise WeightSearchInputError("the result has no usable weights for this table")
    return {m: float(v) for m, v in zip(table.members, w / w.sum())}


def ordered_weights(spec: BlackBoxSpec, weights: Mapping[str, float]) -> list[float]:
    """`weights` in the order of `spec.members` (what `update_blackbox(..., weights=)` takes)."""
    ids = [m.id for m in spec.members]
    if set(ids) != set(weights):
        raise WeightSearchInputError(f"the weights name {sorted(weights)}; the members are {sorted(ids)}")
    return [float(weights[i]) for i in ids]
