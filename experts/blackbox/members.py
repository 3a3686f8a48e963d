"""Ensemble members behind one async interface: generate a candidate, score a text, step a token.

Local members (local, lora, BTM forest) run their blocking torch calls through `run` (the app passes
its worker-thread limiter); remote members use the remote expert's pooled proxy path (retries and
circuit breaker; fallbacks are not followed: a member is that upstream).
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from experts.base import Expert, GenerationParams
from experts.blackbox.maths import EOS, NEG_INF, Dist, bytes_key, candidate_logprobs
from experts.errors import ExpertUnavailableError, GenerationInputError, UpstreamError
from experts.hf import generation
from experts.remote.expert import RemoteExpert

Run = Callable[..., Awaitable[Any]]  # await run(blocking_fn, *args)
# End-of-text strings of common tokenizers: a remote member's top token equal to one of them is EOS.
EOS_STRINGS = frozenset({EOS, "</s>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<eos>"})


@dataclass(slots=True)
class Candidate:
    member: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Ledger:
    """What each member was asked for: calls and tokens (remote: as the upstream reported them)."""

    members: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, member: str, *, prompt: int = 0, completion: int = 0, calls: int = 1) -> None:
        m = self.members.setdefault(member, {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0})
        m["calls"] += calls
        m["prompt_tokens"] += int(prompt)
        m["completion_tokens"] += int(completion)

    @property
    def calls(self) -> int:
        return sum(m["calls"] for m in self.members.values())

    def totals(self) -> dict[str, int]:
        p = sum(m["prompt_tokens"] for m in self.members.values())
        c = sum(m["completion_tokens"] for m in self.members.values())
        return {"calls": self.calls, "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _malformed(expert_id: str, what: str) -> UpstreamError:
    return UpstreamError(expert_id, 502, "malformed", f"upstream answer has no {what}")


# -- local --------------------------------------------------------------------------------------------
def _byte_level(tokenizer: Any) -> bool:
    try:
        return json.loads(tokenizer.backend_tokenizer.to_str())["decoder"]["type"] == "ByteLevel"
    except (AttributeError, KeyError, TypeError, ValueError):
        return False


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the printable character that stands for it in token strings."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def token_keys(tokenizer: Any) -> list[str]:
    """Each id's key (see maths.bytes_key; EOS ids under the EOS key); cached on the tokenizer."""
    keys = getattr(tokenizer, "_mergegate_token_keys", None)
    if keys is None:
        n = len(tokenizer)
        eos = tokenizer.eos_token_id
        keys = []
        if _byte_level(tokenizer):
            inv = {v: k for k, v in _bytes_to_unicode().items()}
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(n)))):
                try:
                    keys.append(generation.token_text(tokenizer, i) if i in special or tok is None
                                else bytes_key(bytes(inv[c] for c in tok)))
                except KeyError:  # an added token outside the byte alphabet
                    keys.append(generation.token_text(tokenizer, i))
        else:
            keys = [generation.token_text(tokenizer, i) for i in range(n)]
        if eos is not None and 0 <= eos < n:
            keys[eos] = EOS
        try:
            tokenizer._mergegate_token_keys = keys
        except AttributeError:  # pragma: no cover - a tokenizer that refuses attributes
            pass
    return keys


def token_index(tokenizer: Any) -> dict[str, list[int]]:
    """key -> the ids with that key (several only where keys collide); cached on the tokenizer."""
    index = getattr(tokenizer, "_mergegate_token_index", None)
    if index is None:
        index = {}
        for i, k in enumerate(token_keys(tokenizer)):
            index.setdefault(k, []).append(i)
        try:
            tokenizer._mergegate_token_index = index
        except AttributeError:  # pragma: no cover
            pass
    return index


class LocalStepper:
    """One local member's token_mix state: the ids so far and the KV cache. Blocking; run in a thread."""

    def __init__(self, expert: Any, prompt: str, max_tokens: int, k: int) -> None:
        m = expert.loaded()
        self.model, self.tokenizer, self.k, self.prompt = m.model, m.tokenizer, k, prompt
        self.ids, self.n_prompt = generation.start_ids(self.tokenizer, prompt)
        self.ctx = generation.context_length(self.model)
        if len(self.ids) + max_tokens > self.ctx:
            raise GenerationInputError(
                f"member {expert.id!r} has a context of {self.ctx} tokens; the prompt has {len(self.ids)} and "
                f"max_tokens asks for {max_tokens} more", code="context_length_exceeded", param="max_tokens")
        self.keys = token_keys(self.tokenizer)
        self.index = token_index(self.tokenizer)
        self.cache: Any = None
        self.pending = list(self.ids)
        self.lp: torch.Tensor | None = None
        self.fed = 0  # tokens run through the model

    def _id_for(self, token: str) -> int | None:
        ids = self.index.get(token)
        if not ids:
            return None
        if len(ids) == 1 or self.lp is None:
            return ids[0]
        return max(ids, key=lambda i: float(self.lp[i]))

    def step(self, chosen: str | None, text: str) -> Dist:
        if chosen is not None:
            tid = self._id_for(chosen)
            if tid is None:  # not a token of this tokenizer: start again from the text
                self.ids, _ = generation.start_ids(self.tokenizer, self.prompt + text)
                self.cache, self.pending = None, list(self.ids)
                if len(self.ids) > self.ctx:
                    raise GenerationInputError(f"the text is over the context of {self.ctx} tokens",
                                               code="context_length_exceeded")
            else:
                self.ids.append(tid)
                self.pending = [tid]
        with torch.inference_mode():
            logits, self.cache = generation.forward(self.model, torch.tensor([self.pending]), self.cache)
            self.fed += len(self.pending)
            self.lp = torch.log_softmax(logits[0, -1].float(), dim=-1)
            vals, idx = torch.topk(self.lp, min(self.k, self.lp.shape[-1]))
        top: dict[str, float] = {}
        for i in idx.tolist():
            s = self.keys[i] if i < len(self.keys) else f"<id:{i}>"  # past the tokenizer: a padded row
            top.setdefault(s, self.lookup(s))
        return Dist(top, self.lookup)

    def lookup(self, token: str) -> float:
        ids = self.index.get(token)
        if not ids or self.lp is None:
            return NEG_INF
        if len(ids) == 1:
            return float(self.lp[ids[0]])
        return float(torch.logsumexp(self.lp[ids], dim=0))


class LocalMember:
    remote = False

    def __init__(self, expert: Expert, weight: float, run: Run) -> None:
        self.expert, self.weight, self.run = expert, weight, run

    @property
    def id(self) -> str:
        return self.expert.id

    async def generate(self, prompt: str, params: GenerationParams, body: dict[str, Any], ledger: Ledger) -> Candidate:
        agenerate = getattr(self.expert, "agenerate", None)  # local experts batch on the engine
        if agenerate is not None:
            r = await agenerate(prompt, params)
        else:
            r = await self.run(self.expert.generate, prompt, params)
        ledger.add(self.id, prompt=r.prompt_tokens, completion=r.completion_tokens)
        c = r.choices[0]
        return Candidate(self.id, c.text, c.finish_reason, r.prompt_tokens, r.completion_tokens)

    async def score(self, prompt: str, text: str, ledger: Ledger) -> list[float]:
        full = prompt + text
        tokens = await self.run(self.expert.score, full)
        ledger.add(self.id, prompt=len(tokens))
        return candidate_logprobs([t.text_offset for t in tokens], [t.logprob for t in tokens], len(prompt), len(full))

    async def stepper(self, prompt: str, max_tokens: int, k: int, ledger: Ledger) -> MemberStepper:
        st = await self.run(LocalStepper, self.expert, prompt, max_tokens, k)
        return _LocalStep(self, st, ledger)

    async def count_prompt(self, prompt: str) -> int:
        return await self.run(self.expert.count_tokens, prompt)


class _LocalStep:
    def __init__(self, member: LocalMember, st: LocalStepper, ledger: Ledger) -> None:
        self.member, self.st, self.ledger = member, st, ledger
        self.prompt_tokens = st.n_prompt

    async def step(self, chosen: str | None, text: str) -> Dist:
        before = self.st.fed
        dist = await self.member.run(self.st.step, chosen, text)
        fed = self.st.fed - before
        self.ledger.add(self.member.id, prompt=fed if chosen is None else 0, completion=0 if chosen is None else fed)
        return dist


# -- remote -------------------------------------------------------------------------------------------
class RemoteMember:
    remote = True

    def __init__(self, expert: RemoteExpert, weight: float) -> None:
        self.expert, self.weight = expert, weight

    @property
    def id(self) -> str:
        return self.expert.id

    def _usage(self, data: dict[str, Any], ledger: Ledger) -> tuple[int, int]:
        u = data.get("usage") or {}
        p, c = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
        ledger.add(self.id, prompt=p, completion=c)
        return p, c

    async def generate(self, prompt: str, params: GenerationParams, body: dict[str, Any], ledger: Ledger) -> Candidate:
        data, _ = await self.expert.proxy("/completions", body)
        p, c = self._usage(data, ledger)
        try:
            choice = data["choices"][0]
            text = choice["text"]
        except (KeyError, IndexError, TypeError):
            raise _malformed(self.id, "choices[0].text") from None
        if not isinstance(text, str):
            raise _malformed(self.id, "text")
        return Candidate(self.id, text, choice.get("finish_reason") or "stop", p, c)

    async def score(self, prompt: str, text: str, ledger: Ledger) -> list[float]:
        full = prompt + text
        tokens = await self.expert.ascore(full)
        ledger.add(self.id, prompt=len(tokens))
        return candidate_logprobs([t.text_offset for t in tokens], [t.logprob for t in tokens], len(prompt), len(full))

    async def stepper(self, prompt: str, max_tokens: int, k: int, ledger: Ledger) -> MemberStepper:
        return _RemoteStep(self, prompt, k, ledger)


class _RemoteStep:
    """One `/completions` call per step: prompt + text so far, max_tokens 1, logprobs k, temperature 0."""

    def __init__(self, member: RemoteMember, prompt: str, k: int, ledger: Ledger) -> None:
        self.member, self.prompt, self.k, self.ledger = member, prompt, k, ledger
        self.prompt_tokens: int | None = None

    async def step(self, chosen: str | None, text: str) -> Dist:
        body = {"prompt": self.prompt + text, "max_tokens": 1, "logprobs": self.k, "temperature": 0}
        data, _ = await self.member.expert.proxy("/completions", body)
        p, _ = self.member._usage(data, self.ledger)
        if self.prompt_tokens is None:
            self.prompt_tokens = p
        return parse_step(self.member.id, data)


def parse_step(member_id: str, data: dict[str, Any]) -> Dist:
    """A remote member's next-token distribution from a one-token completion with logprobs."""
    try:
        choice = data["choices"][0]
    except (KeyError, IndexError, TypeError):
        raise _malformed(member_id, "choices") from None
    lp = choice.get("logprobs")
    tokens = (lp or {}).get("tokens") or []
    if not tokens:
        if choice.get("finish_reason") == "stop" and not choice.get("text"):
            return Dist({EOS: 0.0})  # it ended at once: its greedy next token is end-of-text
        if lp is None:
            raise ExpertUnavailableError(f"the upstream of {member_id!r} returns no logprobs; token_mix needs "
                                         "top-logprobs from /v1/completions")
        raise _malformed(member_id, "logprobs.tokens")
    top_list = lp.get("top_logprobs") or [None]
    top: dict[str, float] = {}
    for s, v in ((top_list[0] or {}) | {tokens[0]: (lp.get("token_logprobs") or [None])[0]}).items():
        if v is None or not isinstance(v, (int, float)) or math.isnan(v):
            continue
        key = EOS if s in EOS_STRINGS else str(s)
        top[key] = max(top.get(key, NEG_INF), float(v))
    if not top:
        raise _malformed(member_id, "top_logprobs")
    return Dist(dict(sorted(top.items(), key=lambda x: -x[1])))


class MemberStepper:  # the shape shared by _LocalStep and _RemoteStep (documentation only)
    prompt_tokens: int | None

    async def step(self, chosen: str | None, text: str) -> Dist:  # pragma: no cover
        raise NotImplementedError
