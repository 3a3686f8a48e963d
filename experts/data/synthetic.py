"""Structured tasks with exact-match answers, generated locally (no corpus): the Evo-Merging pool's data.

A task applies a *skill* (a string transformation, an arithmetic-like map or a table lookup) to inputs
from a *domain* (lowercase or uppercase letter strings, digit strings, small numbers, the names of a
generated table). Every example is ``{"prompt": "<tag>:<input>=", "completion": "<output>\\n"}``: the tag
names the skill (two letters, shared by every domain), the newline ends the answer, so an answer is
right (exact match) when every completion token, newline included, is the model's greedy choice.

Splits are disjoint by input: a string input belongs to train, validation or test by a hash of the
input alone (80 / 10 / 10), whatever the task, so no adapter ever trains on a string that any task
tests on. Examples are drawn by a ``random.Random`` seeded with ``"<task>:<split>"``: deterministic,
distinct inputs within a split. Table lookups are memorisation tasks: every split holds the whole table.

A *shuffled* task (``<skill>/<domain>~shuf``) pairs each input with the answer of another input of the
same split (a fixed derangement): a distractor adapter trained on it learns the format and nothing else.
Task names are ``<skill>/<domain>`` (e.g. ``rev/digits``); :data:`SKILLS` and :data:`DOMAINS` list them.
"""

from __future__ import annotations

import hashlib
import random
import string
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from experts.errors import InvalidExpertError

__all__ = ["DOMAINS", "SHUFFLED", "SKILLS", "Skill", "is_synthetic", "lookup_table", "synthetic_examples",
           "synthetic_task_names"]

SHUFFLED: Final = "~shuf"
_SPLITS: Final = ("train", "validation", "test")
_TABLE_SIZE: Final = 64


@dataclass(frozen=True)
class Skill:
    """A transformation: its tag in the prompt, the map, and the domains it applies to."""

    tag: str
    fn: Callable[[str, str], str]  # (input, the domain's alphabet) -> output
    domains: tuple[str, ...]
    description: str


def _shift(s: str, alphabet: str) -> str:
    return "".join(alphabet[(alphabet.index(c) + 1) % len(alphabet)] for c in s)


def _swap(s: str, alphabet: str) -> str:
    pairs = [s[i + 1] + s[i] for i in range(0, len(s) - 1, 2)]
    return "".join(pairs) + (s[-1] if len(s) % 2 else "")


_STRINGS = ("lower", "upper", "digits")
SKILLS: Final[dict[str, Skill]] = {
    # the base's own skills (its pre-training mixture): copying, counting, first/last, case
    "copy": Skill("cp", lambda s, a: s, _STRINGS, "copy the input"),
    "len": Skill("ln", lambda s, a: str(len(s)), _STRINGS, "the input's length"),
    "first": Skill("fs", lambda s, a: s[0], _STRINGS, "the first character"),
    "last": Skill("ls", lambda s, a: s[-1], _STRINGS, "the last character"),
    "twice": Skill("tw", lambda s, a: s + s, _STRINGS, "the input twice"),
    "upcase": Skill("up", lambda s, a: s.upper(), ("lower",), "to uppercase"),
    "downcase": Skill("dn", lambda s, a: s.lower(), ("upper",), "to lowercase"),
    # the pool's skills (never in the base's mixture)
    "rev": Skill("rv", lambda s, a: s[::-1], _STRINGS, "reverse"),
    "sort": Skill("st", lambda s, a: "".join(sorted(s)), _STRINGS, "sort the characters"),
    "shift": Skill("sh", _shift, _STRINGS, "Caesar shift by one within the alphabet"),
    "evens": Skill("ev", lambda s, a: s[::2], _STRINGS, "every other character"),
    "dup": Skill("dp", lambda s, a: "".join(c + c for c in s), _STRINGS, "double every character"),
    "rotl": Skill("rl", lambda s, a: s[1:] + s[:1], _STRINGS, "rotate left by one"),
    "swap": Skill("sw", _swap, _STRINGS, "swap adjacent pairs"),
    "ends": Skill("en", lambda s, a: s[0] + s[-1], _STRINGS, "first and last character"),
    "dsum": Skill("ds", lambda s, a: str(sum(int(c) for c in s)), ("number",), "digit sum"),
    "bin": Skill("bn", lambda s, a: format(int(s), "b"), ("number",), "decimal to binary"),
    "inc": Skill("ic", lambda s, a: str(int(s) + 1), ("number",), "add one"),
    "capital": Skill("ca", lambda s, a: lookup_table()[s], ("country",), "the capital of a country "
                     "(generated table)"),
}
DOMAINS: Final[dict[str, str]] = {"lower": string.ascii_lowercase, "upper": string.ascii_uppercase,
                                  "digits": string.digits, "number": string.digits, "country": ""}


def _split_of(x: str) -> str:
    """The split of an input string: a stable hash, 80 / 10 / 10."""
    h = int.from_bytes(hashlib.blake2b(x.encode(), digest_size=4).digest(), "big") % 10
    return "train" if h < 8 else ("validation" if h == 8 else "test")


def _syllables(rng: random.Random, k: int) -> str:
    cons, vow = "bcdfghklmnprstvz", "aeiou"
    return "".join(rng.choice(cons) + rng.choice(vow) for _ in range(k)).capitalize()


_table: dict[str, str] = {}
_table_lock = threading.Lock()
_lock = threading.Lock()


def lookup_table() -> dict[str, str]:
    """The generated country -> capital table (64 invented names, fixed by a seed)."""
    with _table_lock:
        if not _table:
            rng = random.Random("country-table")
            names: set[str] = set()
            while len(names) < 2 * _TABLE_SIZE:
                names.add(_syllables(rng, rng.randint(2, 3)))
            ordered = sorted(names)
            rng.shuffle(ordered)
            _table.update(zip(ordered[:_TABLE_SIZE], ordered[_TABLE_SIZE:], strict=True))
        return _table


def _draw(domain: str, rng: random.Random) -> str:
    if domain == "number":
        return str(rng.randint(0, 255))
    return "".join(rng.choice(DOMAINS[domain]) for _ in range(rng.randint(4, 8)))


def _inputs(domain: str, split: str, n: int, seed: str) -> list[str]:
    """`n` distinct inputs of `domain` in `split` (fewer if the split holds fewer), seeded."""
    if domain == "country":
        keys = list(lookup_table())
        random.Random(seed).shuffle(keys)
        return keys[:n]
    if domain == "number":
        pool = [str(i) for i in range(256) if _split_of(str(i)) == split]
        random.Random(seed).shuffle(pool)
        return pool[:n]
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        x = _draw(domain, rng)
        if x not in seen and _split_of(x) == split:
            seen.add(x)
            out.append(x)
    return out


def _parse(name: str) -> tuple[Skill, str, bool]:
    base, shuffled = (name[: -len(SHUFFLED)], True) if name.endswith(SHUFFLED) else (name, False)
    skill, _, domain = base.partition("/")
    if skill not in SKILLS or domain not in SKILLS[skill].domains:
        raise InvalidExpertError(f"unknown structured task {name!r}: give <skill>/<domain>[{SHUFFLED}] with a "
                                 f"skill of {', '.join(SKILLS)} and one of its domains")
    return SKILLS[skill], domain, shuffled


def is_synthetic(name: str) -> bool:
    """True for a structured task name (``<skill>/<domain>`` or its ``~shuf`` variant)."""
    try:
        _parse(name)
    except InvalidExpertError:
        return False
    return True


def synthetic_task_names(*, shuffled: bool = False) -> list[str]:
    """Every ``<skill>/<domain>`` name (and the shuffled variants when asked)."""
    names = [f"{k}/{d}" for k, s in SKILLS.items() for d in s.domains]
    return names + [n + SHUFFLED for n in names] if shuffled else names


_DEFAULT_COUNTS: Final = {"train": 20_000, "validation": 1_000, "test": 1_000}
_cache: dict[tuple[str, str, int], list[dict[str, str]]] = {}


def synthetic_examples(name: str, split: str, max_examples: int | None = None) -> list[dict[str, str]]:
    """The examples of structured task `name` on `split`, deterministic, at most `max_examples`.

    Without `max_examples`: 20,000 train, 1,000 validation and 1,000 test examples (fewer for the small
    domains: numbers 0-255 split by hash, the 64-entry table). The first k examples are the same for
    every k (prefixes of one seeded sequence).
    """
    skill, domain, shuffled = _parse(name)
    if split not in _SPLITS:
        raise InvalidExpertError(f"split must be one of {list(_SPLITS)}, got {split!r}")
    n = _DEFAULT_COUNTS[split] if max_examples is None else max_examples
    key = (name, split, n)
    with _lock:
        cached = _cache.get(key)
    if cached is None:
        xs = _inputs(domain, split, n, f"{name.removesuffix(SHUFFLED)}:{split}")
        ys = [skill.fn(x, DOMAINS[domain]) for x in xs]
        if shuffled and len(ys) > 1:  # input order[k] gets the answer of input order[k + 1]: a derangement
            order = list(range(len(ys)))
            random.Random(f"{name}:{split}:labels").shuffle(order)
            moved = list(ys)
            for k, i in enumerate(order):
                moved[i] = ys[order[(k + 1) % len(order)]]
            ys = moved
        cached = [{"prompt": f"{skill.tag}:{x}=", "completion": f"{y}\n"} for x, y in zip(xs, ys, strict=True)]
        with _lock:
            if len(_cache) > 256:
                _cache.clear()
            _cache[key] = cached
    return [dict(e) for e in cached]
