"""`BlackBoxEnsemble`: an ensemble of local and remote members, answered by score_select or token_mix.

Async only (remote members are reached through the async proxy path): `answer` for a whole answer,
`events` for a stream of `StreamDelta`s ending with an `EnsembleEnd`. The app's BlackBoxService turns
both into OpenAI wire responses.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from experts.base import GenerationParams, GenerationResult, StreamDelta, TokenLogprob
from experts.blackbox.maths import (
    EOS,
    choose,
    key_bytes,
    mean_logprob,
    mix,
    select,
    top_alternatives,
    union,
    weighted_score,
)
from experts.blackbox.members import Candidate, Ledger, LocalMember, RemoteMember, Run
from experts.blackbox.spec import BlackBoxSpec
from experts.errors import ExpertError, ExpertUnavailableError, GenerationInputError, UpstreamError
from experts.hf.chat import render_default
from experts.hf.threads import run_sync
from experts.remote.expert import RemoteExpert
from experts.repository.registry import ExpertRecord

Member = LocalMember | RemoteMember
_WORDS = re.compile(r"\s*\S+|\s+")


@dataclass
class EnsembleEnd:
    """The last event of a stream (and the summary of a whole answer)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    report: dict[str, Any]
    tokens: list[TokenLogprob] | None = None


@dataclass
class _Mix:
    raw: bytes = b""  # the chosen tokens' bytes
    text: str = ""  # raw decoded (an unfinished character shows as U+FFFD until it completes)
    emitted: int = 0
    pending: list[TokenLogprob] = field(default_factory=list)


async def gather(calls: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run the calls concurrently; the first failure cancels the others and is raised as itself."""
    if len(calls) == 1:
        return [await calls[0]()]
    results: list[Any] = [None] * len(calls)

    async def one(i: int) -> None:
        results[i] = await calls[i]()

    try:
        async with anyio.create_task_group() as tg:
            for i in range(len(calls)):
                tg.start_soon(one, i)
    except BaseExceptionGroup as eg:
        raise _first(eg) from None
    return results


def _first(eg: BaseExceptionGroup) -> BaseException:
    for e in eg.exceptions:
        if isinstance(e, BaseExceptionGroup):
            return _first(e)
        if not isinstance(e, anyio.get_cancelled_exc_class()):
            return e
    return eg.exceptions[0]


def word_chunks(text: str) -> list[str]:
    """The pieces a selected answer is streamed in: one word each, with its leading whitespace."""
    return _WORDS.findall(text)


class BlackBoxEnsemble:
    def __init__(self, record: ExpertRecord, get: Callable[[str], Any], run: Run | None = None) -> None:
        self.record = record
        self.spec = BlackBoxSpec.from_dict(record.spec)
        self._get = get  # expert id -> expert (the repository's get)
        self._run: Run = run or (lambda fn, *a: run_sync(fn, *a))
        self._members: list[Member] | None = None

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def mode(self) -> str:
        return self.spec.mode

    @property
    def members(self) -> list[Member]:
        if self._members is None:
            out: list[Member] = []
            for m in self.spec.members:
                expert = self._get(m.id)
                if isinstance(expert, RemoteExpert):
                    out.append(RemoteMember(expert, m.weight))
                elif hasattr(expert, "loaded"):
                    out.append(LocalMember(expert, m.weight, self._run))
                else:
                    raise ExpertUnavailableError(f"member {m.id!r} of {self.id!r} cannot take part in an ensemble")
            self._members = out
        return self._members

    def member(self, member_id: str) -> Member:
        return next(m for m in self.members if m.id == member_id)

    @property
    def weights(self) -> dict[str, float]:
        return {m.id: m.weight for m in self.spec.members}

    # -- the sync Expert protocol (what can be answered without the async path) ---------------------------
    def describe(self) -> dict[str, Any]:
        return {**self.record.to_dict(), "loaded": False}

    def _first_local(self) -> LocalMember | None:
        return next((m for m in self.members if isinstance(m, LocalMember)), None)

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The first local member's chat template, else the default template (blocking)."""
        local = self._first_local()
        return local.expert.render_chat(messages) if local is not None else render_default(messages)

    def count_tokens(self, text: str) -> int:
        local = self._first_local()
        if local is None:
            raise ExpertUnavailableError(f"ensemble {self.id!r} has no local member to count tokens with")
        return local.expert.count_tokens(text)

    def _async_only(self) -> ExpertUnavailableError:
        return ExpertUnavailableError(f"ensemble {self.id!r} is a black-box ensemble, served by the async path")

    def generate(self, prompt: str, params: GenerationParams) -> GenerationResult:
        raise self._async_only()

    def stream(self, prompt: str, params: GenerationParams) -> Iterator[Any]:
        raise self._async_only()

    def score(self, text: str, *, top_logprobs: int = 0) -> list[TokenLogprob]:
        raise self._async_only()

    async def room(self, prompt: str, wanted: int) -> int:
        """`wanted` tokens, cut so that the prompt fits every local member's context (at least 1)."""
        room = wanted
        for m in self.members:
            if isinstance(m, LocalMember):
                ctx = m.expert.describe().get("context_length") or 2048
                used = await m.count_prompt(prompt)
                room = min(room, ctx - max(used, 1))
        return max(1, room)

    # -- answers -------------------------------------------------------------------------------------------
    async def answer(self, prompt: str, params: GenerationParams, body: dict[str, Any]) -> EnsembleEnd:
        """The whole answer. `body` is the upstream request for remote candidates (score_select)."""
        if self.mode == "score_select":
            return await self._select(prompt, params, body)
        end: EnsembleEnd | None = None
        tokens: list[TokenLogprob] = []
        async for ev in self._mix(prompt, params):
            if isinstance(ev, EnsembleEnd):
                end = ev
            else:
                tokens.extend(ev.tokens)
        assert end is not None
        end.tokens = tokens if params.logprobs is not None else None
        return end

    async def events(self, prompt: str, params: GenerationParams, body: dict[str, Any]
                     ) -> AsyncIterator[StreamDelta | EnsembleEnd]:
        """Stream events; the first is computed before this returns, so errors still get a status.

        score_select needs every candidate whole before it can choose, so its stream starts when the
        answer is known and sends it word by word; token_mix streams each token as it is chosen."""
        if self.mode == "score_select":
            end = await self._select(prompt, params, body)
            pieces = word_chunks(end.text)

            async def replay() -> AsyncIterator[StreamDelta | EnsembleEnd]:
                for i, piece in enumerate(pieces):
                    yield StreamDelta(0, piece, (), end.finish_reason if i == len(pieces) - 1 else None)
                if not pieces:
                    yield StreamDelta(0, "", (), end.finish_reason)
                yield end

            return replay()
        it = self._mix(prompt, params)
        first = await anext(it)

        async def rest() -> AsyncIterator[StreamDelta | EnsembleEnd]:
            try:
                yield first
                async for ev in it:
                    yield ev
            finally:
                await it.aclose()

        return rest()

    # -- score_select ---------------------------------------------------------------------------------------
    async def _select(self, prompt: str, params: GenerationParams, body: dict[str, Any]) -> EnsembleEnd:
        """A member that is down (5xx, 429, breaker open, unavailable) is left out: its candidate is
        missing, or it does not score (the others' weights renormalise). The request fails only when
        no candidate, or no score at all, could be had; errors that say the request is wrong fail it."""
        ledger = Ledger()
        gens = [self.member(c) for c in self.spec.candidates]
        outcomes = await gather([lambda m=m: _tolerant(m.generate(prompt, params, body, ledger), scoring=False)
                                 for m in gens])
        cands: list[Candidate] = [o for o in outcomes if isinstance(o, Candidate)]
        failures = [{"member": m.id, "stage": "generate", "error": str(o)}
                    for m, o in zip(gens, outcomes) if isinstance(o, ExpertError)]
        if not cands:
            raise next(o for o in outcomes if isinstance(o, ExpertError))
        scorers = [m for m in self.members if m.weight > 0]
        texts = list(dict.fromkeys(c.text for c in cands))  # each distinct text is scored once
        jobs = [(t, m) for t in texts for m in scorers if t]
        results = await gather([lambda t=t, m=m: _tolerant(m.score(prompt, t, ledger), scoring=True)
                                for t, m in jobs]) if jobs else []
        if jobs and all(isinstance(r, ExpertError) for r in results):
            raise results[0]
        per_text: dict[str, dict[str, float | None]] = {t: {} for t in texts}
        counts: dict[str, dict[str, int]] = {t: {} for t in texts}
        for (t, m), values in zip(jobs, results):
            if isinstance(values, ExpertError):
                per_text[t][m.id] = None
                failures.append({"member": m.id, "stage": "score", "error": str(values)})
                continue
            per_text[t][m.id] = mean_logprob(values)
            counts[t][m.id] = len(values)
        weights = self.weights
        scores = [weighted_score(per_text[c.text], weights) for c in cands]
        best = select(scores)
        chosen = cands[best]
        report = {
            "mode": "score_select", "selected": chosen.member, "weights": weights,
            "candidates": [{"member": c.member, "text": c.text, "finish_reason": c.finish_reason,
                            "score": _finite(s), "scores": per_text[c.text], "scored_tokens": counts[c.text]}
                           for c, s in zip(cands, scores)],
            "failures": failures, "member_usage": ledger.members, "upstream": ledger.totals(),
        }
        return EnsembleEnd(chosen.text, chosen.finish_reason, chosen.prompt_tokens, chosen.completion_tokens, report)

    # -- token_mix ------------------------------------------------------------------------------------------
    async def _mix(self, prompt: str, params: GenerationParams) -> AsyncIterator[StreamDelta | EnsembleEnd]:
        ledger = Ledger()
        active = [m for m in self.members if m.weight > 0]  # a member with weight 0 is never called
        weights = [m.weight for m in active]
        k = self.spec.top_logprobs
        steppers = await gather([lambda m=m: m.stepper(prompt, params.max_tokens, k, ledger) for m in active])
        seed = params.sampling_seed()
        rng = random.Random(seed)
        want = params.logprobs is not None
        holdback = max((len(s) for s in params.stop), default=1) - 1
        row = _Mix()
        chosen: str | None = None
        finish = "length"
        steps = 0
        for step in range(params.max_tokens):
            dists = await gather([lambda s=s, prev=chosen, text=row.text: s.step(prev, text) for s in steppers])
            mixed = mix(dists, weights)
            chosen = choose(mixed, temperature=params.temperature, top_p=params.top_p, rng=rng)
            steps += 1
            if chosen == EOS:
                finish = "stop"
                break
            before = len(row.text)
            raw = key_bytes(chosen)
            row.raw += raw
            row.text = row.raw.decode("utf-8", errors="replace")
            if want:
                p = mixed[chosen]
                row.pending.append(TokenLogprob(chosen, -1, _log(p), top_alternatives(mixed, params.logprobs or 0),
                                                before, raw))
            cut = _find_stop(row.text, params.stop, before - holdback) if params.stop else None
            if cut is not None:
                row.text, finish = row.text[:cut], "stop"
                break
            if step + 1 < params.max_tokens:
                delta = _flush(row, final=False, holdback=holdback)
                if delta is not None:
                    yield delta
        yield _flush(row, final=True, finish=finish) or StreamDelta(0, "", (), finish)
        prompt_tokens = next((s.prompt_tokens for s in steppers if s.prompt_tokens is not None), 0)
        report = {"mode": "token_mix", "weights": self.weights, "steps": steps, "top_logprobs": k,
                  "members_called": [m.id for m in active], "union_size_last_step": len(union(dists)) if steps else 0,
                  "member_usage": ledger.members, "upstream": ledger.totals()}
        yield EnsembleEnd(row.text, finish, prompt_tokens, steps, report)


async def _tolerant(call: Awaitable[Any], *, scoring: bool) -> Any:
    """The call's result, or the error of a member that is down (and, when scoring, of a candidate the
    member cannot score, e.g. one longer than its context); other errors propagate."""
    try:
        return await call
    except UpstreamError as e:
        if e.fallback_ok:
            return e
        raise
    except ExpertUnavailableError as e:
        return e
    except GenerationInputError as e:
        if scoring:
            return e
        raise


def _finite(x: float) -> float | None:
    return x if x != float("-inf") else None


def _log(p: float) -> float:
    return math.log(p) if p > 0 else float("-inf")


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    hits = [p for s in stops if (p := text.find(s, max(0, start))) != -1]
    return min(hits) if hits else None


def _flush(row: _Mix, *, final: bool, holdback: int = 0, finish: str | None = None) -> StreamDelta | None:
    end = len(row.text) if final else max(row.emitted, len(row.text) - holdback)
    if not final:
        while end > row.emitted and row.text[end - 1] == "\ufffd":  # maybe an unfinished character
            end -= 1
    text = row.text[row.emitted:end]
    if not text and not final:
        return None
    tokens = tuple(row.pending)
    row.pending = []
    row.emitted = end
    return StreamDelta(0, text, tokens, finish if final else None)
