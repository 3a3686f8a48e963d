"""The two combination rules as pure functions (hand-checkable; see README "Black-box ensembles").

score_select:
    For candidate c (text y_c) and scoring member j, T_j(c) is the set of tokens of prompt + y_c,
    under j's own tokenizer, that end after the prompt (hold at least one character of y_c), less a
    first token without a log-probability. l_j(c) = mean over T_j(c) of log p_j(token | tokens before).
    S(c) = sum_j w_j l_j(c) / sum_j w_j over the members j with w_j > 0 that could score c.
    The answer is argmax_c S(c); ties go to the earlier candidate; a candidate no member could
    score (an empty text) has S = -inf.

token_mix:
    At each step every member j with w_j > 0 gives its top-k next tokens (token strings with
    log-probabilities). U is the union of those sets (in member order). A member that knows its
    full distribution (a local one) gives p_j(t) for every t in U; a remote member knows only its
    top-k, and p_j(t) = 0 outside it. q_j = p_j restricted to U and renormalised;
    m(t) = sum_j w_j q_j(t) / sum_j w_j. The next token is argmax m (greedy, temperature 0; ties go
    to the token first seen) or a draw from m^(1/T), cut to the top_p nucleus, with a seeded RNG.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

EOS = "<|endoftext|>"  # the end-of-text key in mixed distributions (members' EOS strings map to it)
NEG_INF = float("-inf")


# -- token keys ----------------------------------------------------------------------------------------
# Tokens are exchanged as strings, as OpenAI's logprobs name them: a token whose bytes are valid UTF-8
# is its text; one that is part of a character is "bytes:" + its bytes as \xNN escapes.
def bytes_key(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def key_bytes(key: str) -> bytes:
    if key.startswith("bytes:"):
        body = key[6:]
        try:
            return bytes(int(h, 16) for h in body.split("\\x")[1:])
        except ValueError:
            return key.encode()
    return key.encode()


# -- score_select -----------------------------------------------------------------------------------
def candidate_logprobs(offsets: Sequence[int], logprobs: Sequence[float | None], prompt_len: int,
                       text_len: int) -> list[float]:
    """Log-probabilities of the tokens of prompt+candidate that end after the prompt.

    offsets: each token's start (characters) in prompt+candidate; text_len = len(prompt+candidate)."""
    ends = list(offsets[1:]) + [text_len]
    return [float(lp) for lp, end in zip(logprobs, ends) if end > prompt_len and lp is not None]


def mean_logprob(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def weighted_score(per_member: Mapping[str, float | None], weights: Mapping[str, float]) -> float:
    """S(c) from each scoring member's mean log-probability (None: that member could not score c)."""
    num = den = 0.0
    for member, value in per_member.items():
        w = weights.get(member, 0.0)
        if value is None or w <= 0:
            continue
        num += w * value
        den += w
    return num / den if den > 0 else NEG_INF


def select(scores: Sequence[float]) -> int:
    """Index of the best score; ties (and all -inf) go to the earliest."""
    best = 0
    for i, s in enumerate(scores):
        if s > scores[best]:
            best = i
    return best


# -- token_mix ---------------------------------------------------------------------------------------
@dataclass(slots=True)
class Dist:
    """One member's next-token distribution: its top-k, and for a local member the full distribution."""

    top: dict[str, float]  # token string -> log-probability, best first
    full: Callable[[str], float] | None = None  # log p(token string) for any string (local members)

    def logprob(self, token: str) -> float:
        if self.full is not None:
            return self.full(token)
        return self.top.get(token, NEG_INF)


def union(dists: Sequence[Dist]) -> list[str]:
    seen: dict[str, None] = {}
    for d in dists:
        for t in d.top:
            seen.setdefault(t, None)
    return list(seen)


def mix(dists: Sequence[Dist], weights: Sequence[float]) -> dict[str, float]:
    """The mixture m over the union of the members' top-k (probabilities summing to 1, union order)."""
    tokens = union(dists)
    if not tokens:
        raise ValueError("no member returned any next token")
    total_w = 0.0
    mixed = dict.fromkeys(tokens, 0.0)
    for d, w in zip(dists, weights):
        if w <= 0:
            continue
        probs = [math.exp(d.logprob(t)) for t in tokens]
        z = sum(probs)
        if z <= 0:
            continue
        total_w += w
        for t, p in zip(tokens, probs):
            mixed[t] += w * p / z
    if total_w <= 0:
        raise ValueError("no member with a weight gave a usable distribution")
    return {t: p / total_w for t, p in mixed.items()}


def choose(mixed: Mapping[str, float], *, temperature: float, top_p: float, rng: random.Random) -> str:
    if temperature <= 0:
        best, best_p = "", -1.0
        for t, p in mixed.items():
            if p > best_p:
                best, best_p = t, p
        return best
    top = max(mixed.values(), default=0.0)
    # relative to the most likely token (which keeps weight 1), so a tiny temperature cannot underflow them all
    items = [(t, (p / top) ** (1.0 / temperature)) for t, p in mixed.items() if p > 0]
    z = sum(p for _, p in items)
    items = sorted(((t, p / z) for t, p in items), key=lambda x: -x[1])
    if top_p < 1.0:
        kept, acc = [], 0.0
        for t, p in items:
            if acc >= top_p:
                break
            kept.append((t, p))
            acc += p
        items = kept
        z = sum(p for _, p in items)
        items = [(t, p / z) for t, p in items]
    r = rng.random()
    acc = 0.0
    for t, p in items:
        acc += p
        if r < acc:
            return t
    return items[-1][0]


def top_alternatives(mixed: Mapping[str, float], k: int) -> tuple[tuple[str, float], ...]:
    best = sorted(((t, p) for t, p in mixed.items() if p > 0), key=lambda x: -x[1])[:k]
    return tuple((t, math.log(p)) for t, p in best)
