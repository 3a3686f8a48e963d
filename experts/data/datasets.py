"""Task datasets made from the local corpora.

A *task* turns one built-in corpus split into examples: ``{"prompt", "completion"}`` pairs (only the
completion's tokens are scored) or ``{"text"}`` documents (every token but the first is scored).
Everything is deterministic: the examples are cut from the corpus split in text order, then shuffled
by a ``random.Random`` seeded with ``"<task>:<split>"``; train / validation / test come from the
corpus' own splits, so they never share a document.

``TASKS[name].pool`` says whether the demo LoRA pool (:mod:`experts.evo.pool`) trains on the task;
``HELD_OUT`` lists the others: target tasks that no pool adapter has seen (for the Evo-Merging
reproduction). ``lm-<domain>`` tasks are plain-text slices of a domain.

Structured tasks with exact-match answers (``rev/digits``, ``sort/upper``, ...: generated, no corpus) live
in :mod:`experts.data.synthetic`; :func:`load_task` serves them by name too (no corpora needed).

Encoding the examples for a model and scoring them (the masked loss) is :mod:`experts.data.scoring`.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from experts.data.corpora import load_split
from experts.data.synthetic import is_synthetic, synthetic_examples
from experts.errors import InvalidExpertError

__all__ = ["HELD_OUT", "POOL_TASKS", "SPLITS", "TASKS", "Task", "load_task", "task_names"]

SPLITS = ("train", "validation", "test")


# ------------------------------------------------------------------------------------------------
# builders: corpus split text -> examples in text order


def _words(s: str) -> list[str]:
    return s.split()


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _code_functions(text: str) -> Iterable[tuple[list[str], int]]:
    """(lines, index of a `def` line) for every function header with a body below it."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if re.match(r"^\s*(async\s+)?def \w+\(.*\):\s*$", line):
            yield lines, i


def _body(lines: list[str], i: int, limit: int = 40) -> list[str]:
    """The non-blank lines of the function whose header is lines[i] (deeper indented), up to `limit`."""
    indent = len(lines[i]) - len(lines[i].lstrip())
    out = []
    for line in lines[i + 1 : i + 1 + 4 * limit]:
        if not line.strip():
            continue
        if len(line) - len(line.lstrip()) <= indent:
            break
        out.append(line)
        if len(out) >= limit:
            break
    return out


def _code_continue(text: str) -> list[dict[str, str]]:
    """Continue a Python function: the def line and its first 2 lines -> the next 3 lines."""
    out = []
    for lines, i in _code_functions(text):
        body = _body(lines, i, limit=5)
        if len(body) >= 5:
            prompt = "\n".join([lines[i], *body[:2]]) + "\n"
            out.append({"prompt": prompt, "completion": "\n".join(body[2:5])})
    return out


def _code_return(text: str) -> list[dict[str, str]]:
    """Write the return statement: the def line and the lines before the first `return` -> that line."""
    out = []
    for lines, i in _code_functions(text):
        body = _body(lines, i, limit=8)
        k = next((j for j, b in enumerate(body) if b.lstrip().startswith("return ")), None)
        if k is not None and 1 <= k <= 6:
            out.append({"prompt": "\n".join([lines[i], *body[:k]]) + "\n", "completion": body[k]})
    return out


_DICT_LINE = re.compile(r"^(?P<word>[^()\n]{1,60}?) \((?P<pos>[^)\n]{0,20})\) (?P<defn>.+)$")


def _dictionary_define(text: str) -> list[dict[str, str]]:
    """Define a word in dictionary style: "word (pos)" -> " definition" (at most 40 words)."""
    out = []
    for line in text.split("\n"):
        m = _DICT_LINE.match(line.strip())
        if m and len(_words(m["defn"])) >= 3:
            defn = " ".join(_words(m["defn"])[:40])
            out.append({"prompt": f"{m['word']} ({m['pos']})", "completion": " " + defn})
    return out


def _dictionary_word(text: str) -> list[dict[str, str]]:
    """Name the word (reverse dictionary): "definition\\nWord:" -> " word"."""
    out = []
    for line in text.split("\n"):
        m = _DICT_LINE.match(line.strip())
        if m and 4 <= len(_words(m["defn"])) <= 40 and len(_words(m["word"])) == 1:
            out.append({"prompt": f"{m['defn'].strip()}\nWord:", "completion": f" {m['word']}"})
    return out


def _legal_continue(text: str) -> list[dict[str, str]]:
    """Continue a licence clause: 20 words of a paragraph -> the next 16 (windows every 60 words)."""
    out = []
    for para in _paragraphs(text):
        w = _words(para)
        for start in range(0, len(w) - 36 + 1, 60):
            prompt, completion = " ".join(w[start : start + 20]), " ".join(w[start + 20 : start + 36])
            out.append({"prompt": prompt, "completion": " " + completion})
    return out


def _verses(text: str) -> list[list[str]]:
    """Chapters of verses (the "Book N" heading dropped)."""
    chapters = []
    for para in _paragraphs(text):
        lines = [ln.strip() for ln in para.split("\n") if ln.strip()]
        if len(lines) >= 2:
            chapters.append(lines[1:])
    return chapters


def _verse_continue(text: str) -> list[dict[str, str]]:
    """Continue a verse: its first half (in words) -> the second half."""
    out = []
    for chapter in _verses(text):
        for verse in chapter:
            w = _words(verse)
            if len(w) >= 8:
                h = len(w) // 2
                out.append({"prompt": " ".join(w[:h]), "completion": " " + " ".join(w[h:])})
    return out


def _verse_next(text: str) -> list[dict[str, str]]:
    """The next verse: a verse and a line break -> the following verse of the chapter."""
    out = []
    for chapter in _verses(text):
        for a, b in zip(chapter, chapter[1:]):
            if len(_words(b)) <= 60:
                out.append({"prompt": a + "\n", "completion": b})
    return out


def _jargon_define(text: str) -> list[dict[str, str]]:
    """Define a hacker term: "term:" -> " definition" (at most 40 words)."""
    out = []
    for para in _paragraphs(text):
        m = re.match(r"^(?P<term>[^:\n]{1,60}):\s+(?P<defn>.+)", para, re.S)
        if m and len(_words(m["defn"])) >= 3:
            out.append({"prompt": f"{m['term']}:", "completion": " " + " ".join(_words(m["defn"])[:40])})
    return out


_IDENT = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*$")


def _docstring_summary(text: str) -> list[dict[str, str]]:
    """Summarise an API: a qualified name line -> the first line of its docstring."""
    out = []
    for para in _paragraphs(text):
        lines = para.split("\n")
        if len(lines) >= 2 and _IDENT.match(lines[0].strip()) and len(_words(lines[1])) >= 3:
            out.append({"prompt": lines[0].strip() + "\n", "completion": lines[1].strip()})
    return out


def _lm_slices(text: str, chars: int = 600) -> list[dict[str, str]]:
    """Plain-text pieces of about `chars` characters, cut at line breaks."""
    out, start, n = [], 0, len(text)
    while start < n:
        end = min(n, start + chars)
        if end < n:
            nl = text.rfind("\n", start + chars // 2, end)
            end = nl + 1 if nl > start else end
        piece = text[start:end].strip()
        if len(piece) >= 40:
            out.append({"text": piece})
        start = end
    return out


@dataclass(frozen=True)
class Task:
    name: str
    domain: str  # the corpus it is cut from
    description: str
    build: Callable[[str], list[dict[str, str]]]
    pool: bool  # the demo LoRA pool trains on it (False: held out for target tasks)

    @property
    def kind(self) -> str:
        return "text" if self.name.startswith("lm-") else "pairs"


_TASK_LIST = [
    Task("code_continue", "code", "continue a Python function", _code_continue, True),
    Task("docstring_summary", "python_docs", "summarise an API from its qualified name", _docstring_summary,
         True),
    Task("dictionary_define", "dictionary", "define a word in dictionary style", _dictionary_define, True),
    Task("legal_continue", "legal", "continue a licence clause", _legal_continue, True),
    Task("verse_continue", "scripture", "continue a verse", _verse_continue, True),
    Task("code_return", "code", "write a function's return statement", _code_return, False),
    Task("dictionary_word", "dictionary", "name the word for a definition", _dictionary_word, False),
    Task("verse_next", "scripture", "write the next verse", _verse_next, False),
    Task("jargon_define", "jargon", "define a hacker-slang term", _jargon_define, False),
]
for _d in ("code", "python_docs", "legal", "scripture", "dictionary", "jargon"):
    _TASK_LIST.append(Task(f"lm-{_d}", _d, f"plain text from the {_d} corpus", _lm_slices, False))

TASKS: dict[str, Task] = {t.name: t for t in _TASK_LIST}
POOL_TASKS = [t.name for t in _TASK_LIST if t.pool]
HELD_OUT = [t.name for t in _TASK_LIST if not t.pool and t.kind == "pairs"]


def task_names() -> list[str]:
    """The corpus tasks (structured tasks: :func:`experts.data.synthetic.synthetic_task_names`)."""
    return list(TASKS)


_cache: dict[tuple[str, str, str], list[dict[str, str]]] = {}
_cache_lock = threading.Lock()


def load_task(btm: Any, name: str, split: str = "validation",
              max_examples: int | None = None) -> list[dict[str, str]]:
    """The examples of task `name` on a corpus split (deterministic order), at most `max_examples`.

    Args:
        btm: an :class:`experts.btm.operations.BTM` (gives the corpora root and builds missing corpora);
            not used (may be None) for a structured task.
        name: a key of :data:`TASKS`, or a structured task of :mod:`experts.data.synthetic`.
        split: "train", "validation" or "test".
    """
    if split not in SPLITS:
        raise InvalidExpertError(f"split must be one of {list(SPLITS)}, got {split!r}")
    task = TASKS.get(name)
    if task is None and is_synthetic(name):
        return synthetic_examples(name, split, max_examples)
    if task is None:
        raise InvalidExpertError(f"unknown task {name!r}; tasks: {', '.join(TASKS)} or a structured task "
                                 "<skill>/<domain> (experts.data.synthetic)")
    key = (str(btm.corpora_root), name, split)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is None:
        btm.ensure_corpus(task.domain)
        examples = task.build(load_split(btm.corpora_root, task.domain, split))
        random.Random(f"{name}:{split}").shuffle(examples)
        if not examples:
            raise InvalidExpertError(f"task {name!r} has no examples in the {split} split of {task.domain!r}")
        with _cache_lock:
            cached = _cache.setdefault(key, examples)
    out = cached if max_examples is None else cached[:max_examples]
    return [dict(e) for e in out]
