"""The one redaction path: every secret this process knows is removed from whatever leaves it.

Everything that goes out passes through :data:`REDACTOR`:

* HTTP responses, error envelopes and SSE events (ours and relayed), headers included:
  ``app.redaction.RedactionMiddleware``, the outermost middleware;
* upstream answers and events as a remote expert receives them (``experts.remote.expert``), so no
  consumer of a remote expert (ensembles, scoring, jobs) ever holds a key;
* upstream error messages (:func:`experts.remote.upstream.error_fields`), before anything is cut short;
* job rows (``params``, ``message``, ``error``, ``detail``, ``result``) before they are written
  (``experts.repository.jobs``);
* log records of the whole process, when they are created (:func:`install_log_redaction`).

The secret set is process-wide, like logging: every stored remote key (``SecretStore``), the provider
keys of search jobs and ``mergegate search`` (``experts.evo``), the admin key and the client keys
(``app.main``). A secret is never dropped from it: a rotated or deleted key stays redacted for the
life of the process.

For each secret, what is redacted is the secret itself, its JSON-escaped, HTML-escaped, URL-encoded
and base64 forms (standard and URL-safe alphabets, at each of the three byte alignments inside a
longer base64 text), and any prefix or suffix of one of those forms long enough to identify it:
at least :data:`MIN_PREFIX` characters, 4 of them past its leading (trailing) words such as the
public ``sk-proj-``. That is what is left of a key when a message is cut short after or before it,
so truncating first cannot bypass redaction. A "secret" shorter than :data:`MIN_PREFIX` cannot be
told apart from ordinary words (a key "wrong" would rewrite every "wrong" in every answer): it is not
redacted. Real API keys are far longer.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import re
import threading
from collections.abc import Iterable
from typing import Any, Generic, TypeVar
from urllib.parse import quote, quote_plus

__all__ = ["MARK", "MIN_PREFIX", "REDACTOR", "RedactingFilter", "Redactor", "forms", "install_log_redaction"]

MARK = "[redacted]"
MIN_PREFIX = 8  # characters: a shorter piece of a key does not identify it
_GRAM = 4  # every MIN_PREFIX-long window holds a _GRAM-long piece that starts at a multiple of _STRIDE
_STRIDE = MIN_PREFIX - _GRAM + 1
_MAX_DEPTH = 64  # deeper JSON is redacted as its text

S = TypeVar("S", str, bytes)


def forms(secret: str) -> set[str]:
    """The ways `secret` can be written in text: itself, escaped and encoded (see the module docstring)."""
    out = {secret, html.escape(secret)}
    escaped = json.dumps(secret)[1:-1]
    out |= {escaped, json.dumps(secret, ensure_ascii=False)[1:-1], escaped.replace("/", "\\/"),
            json.dumps(escaped)[1:-1]}
    for q in (quote(secret, safe=""), quote(secret), quote_plus(secret)):
        out |= {q, re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), q)}
    raw = secret.encode()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        for offset in range(3):  # the characters that only this secret's bytes decide
            text = encode(b"\0" * offset + raw).decode()
            out.add(text[(8 * offset + 5) // 6:(8 * (offset + len(raw))) // 6])
    return {f for f in out if len(f) >= MIN_PREFIX}


_HEAD = re.compile(r"^(?:[A-Za-z]+[-_.:]){0,3}")  # leading words, e.g. sk-proj-: public, they identify nothing
_TAIL = re.compile(r"(?:[-_.:][A-Za-z]+){0,3}$")
_OWN = 4  # characters past those words that a prefix (suffix) must reach to be taken for a piece of the key


def _limits(form: str, size: Any = len) -> tuple[int, int]:
    """The shortest prefix and suffix of `form` that are redacted: MIN_PREFIX characters, and _OWN past
    its leading (trailing) words. A key made of words only ("provider-client-key") is thus redacted whole
    but not by pieces, which would rewrite the word "provider" everywhere."""
    head = _HEAD.match(form)
    tail = _TAIL.search(form)
    return (max(MIN_PREFIX, size(head.group() if head else "") + _OWN),
            max(MIN_PREFIX, size(tail.group() if tail else "") + _OWN))


class _Index(Generic[S]):
    """The forms of every secret, indexed for one kind of text (str or bytes).

    Every MIN_PREFIX-long window of a form holds a _GRAM-long piece that starts at a multiple of
    _STRIDE in the text, so the text is scanned at those positions only; a hit is then checked and
    extended as far as the form goes."""

    def __init__(self, entries: Iterable[tuple[S, int, int]], mark: S, backslash: S) -> None:
        self.mark, self.backslash = mark, backslash
        self.quotes = (mark[:0] + '"', mark[:0] + "'") if isinstance(mark, str) else (b'"', b"'")
        # piece -> (form, offset of the piece in its window, head window?, shortest match redacted)
        self.grams: dict[S, list[tuple[S, int, bool, int]]] = {}
        for f, min_head, min_tail in set(entries):
            tail = len(f) - MIN_PREFIX
            for k in range(_STRIDE):
                self.grams.setdefault(f[k:k + _GRAM], []).append((f, k, True, min(min_head, len(f))))
                self.grams.setdefault(f[tail + k:tail + k + _GRAM], []).append((f, k, False, min(min_tail, len(f))))
        self.empty = not self.grams

    def spans(self, text: S) -> list[tuple[int, int]]:
        found: list[tuple[int, int]] = []
        grams, n = self.grams, len(text)
        for i in range(0, n - _GRAM + 1, _STRIDE):
            hits = grams.get(text[i:i + _GRAM])
            if not hits:
                continue
            for f, k, head, shortest in hits:
                p = i - k
                if p < 0 or p + MIN_PREFIX > n:
                    continue
                if head and text[p:p + MIN_PREFIX] == f[:MIN_PREFIX]:
                    j = _common_prefix(text, p, f)
                    while (MIN_PREFIX < j < len(f) and text[p + j - 1:p + j] in self.quotes
                           and not self._escaped(text, p + j - 1)):
                        j -= 1  # a piece cut short, then quoted: the closing quote is not the key's
                    if j >= shortest:
                        found.append(self._whole(text, p, p + j))
                elif not head and text[p:p + MIN_PREFIX] == f[-MIN_PREFIX:]:
                    end = p + MIN_PREFIX
                    j = _common_suffix(text, end, f)
                    while MIN_PREFIX < j < len(f) and text[end - j:end - j + 1] in self.quotes:
                        j -= 1
                    if j >= shortest:
                        found.append(self._whole(text, end - j, end))
        return found

    def _escaped(self, text: S, at: int) -> bool:
        """Is the character at `at` escaped (an odd run of backslashes before it)?"""
        run = 0
        while at - run > 0 and text[at - run - 1:at - run] == self.backslash:
            run += 1
        return run % 2 == 1

    def _whole(self, text: S, start: int, end: int) -> tuple[int, int]:
        """Never cut a backslash escape in two (the text may be JSON): an odd run of backslashes at the
        end stays outside the span, one just before the start goes inside it."""
        run = 0
        while run < end - start and text[end - 1 - run:end - run] == self.backslash:
            run += 1
        if run % 2:
            end -= 1
        return (start - 1 if self._escaped(text, start) else start), end

    def redact(self, text: S) -> S:
        if self.empty or not text:
            return text
        spans = self.spans(text)
        if not spans:
            return text
        spans.sort()
        parts, pos = [], 0
        for start, end in spans:
            if end <= pos:
                continue
            if start > pos:
                parts += [text[pos:start], self.mark]
            elif not parts:
                parts.append(self.mark)
            pos = end
        parts.append(text[pos:])
        return text[:0].join(parts)


def _common_prefix(text: S, start: int, form: S) -> int:
    j, limit = MIN_PREFIX, min(len(form), len(text) - start)
    while j < limit and text[start + j] == form[j]:
        j += 1
    return j


def _common_suffix(text: S, end: int, form: S) -> int:
    j, limit = MIN_PREFIX, min(len(form), end)
    while j < limit and text[end - 1 - j] == form[len(form) - 1 - j]:
        j += 1
    return j


class Redactor:
    """A set of secrets and the functions that remove them from text, bytes and JSON-like objects."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: frozenset[str] = frozenset()
        self._text: _Index[str] = _Index((), MARK, "\\")
        self._bytes: _Index[bytes] = _Index((), MARK.encode(), b"\\")

    def add(self, *secrets: str | None) -> None:
        """Redact these from now on (None and secrets shorter than MIN_PREFIX are ignored)."""
        new = {s.strip() for s in secrets if s and len(s.strip()) >= MIN_PREFIX}
        if new <= self._secrets:
            return
        with self._lock:
            everything = self._secrets | new
            all_forms = {f for s in everything for f in forms(s)}
            self._text = _Index([(f, *_limits(f)) for f in all_forms], MARK, "\\")
            self._bytes = _Index([(f.encode(), *_limits(f, lambda t: len(t.encode()))) for f in all_forms],
                                 MARK.encode(), b"\\")
            self._secrets = frozenset(everything)

    def __contains__(self, secret: str) -> bool:
        return secret in self._secrets

    def redact(self, text: str) -> str:
        return self._text.redact(text)

    def redact_bytes(self, data: bytes) -> bytes:
        return self._bytes.redact(data)

    def redact_obj(self, obj: Any, _depth: int = 0) -> Any:
        """A copy of JSON-like `obj` (dicts, lists, tuples, strings, numbers) with every string redacted,
        dict keys included; other values are returned as they are."""
        if isinstance(obj, str):
            return self._text.redact(obj)
        if self._text.empty or not isinstance(obj, dict | list | tuple):
            return obj
        if _depth >= _MAX_DEPTH:
            try:
                return self._text.redact(json.dumps(obj, default=str))
            except (RecursionError, ValueError, TypeError):
                return MARK
        if isinstance(obj, dict):
            return {(self._text.redact(k) if isinstance(k, str) else k): self.redact_obj(v, _depth + 1)
                    for k, v in obj.items()}
        out = [self.redact_obj(v, _depth + 1) for v in obj]
        return tuple(out) if isinstance(obj, tuple) else out


REDACTOR = Redactor()


def redact(text: str) -> str:
    """`text` without any secret this process knows (see the module docstring)."""
    return REDACTOR.redact(text)


def redact_obj(obj: Any) -> Any:
    return REDACTOR.redact_obj(obj)


def add_secrets(*secrets: str | None) -> None:
    REDACTOR.add(*secrets)


class RedactingFilter(logging.Filter):
    """Rewrites a record in place: its message (arguments applied), exception text and stack, redacted."""

    def __init__(self, redactor: Redactor = REDACTOR) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep what there is
            message = f"{record.msg} {record.args}"
        record.msg, record.args = self.redactor.redact(message), ()
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redactor.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redactor.redact(record.stack_info)
        return True


_install_lock = threading.Lock()


def install_log_redaction(redactor: Redactor = REDACTOR) -> None:
    """Redact every log record of this process as it is created, whichever logger and handler it then
    reaches (uvicorn's, a file handler, one configured later). Idempotent."""
    with _install_lock:
        previous = logging.getLogRecordFactory()
        if getattr(previous, "redacting", False):
            return
        redacting = RedactingFilter(redactor)

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            redacting.filter(record)
            return record

        factory.redacting = True  # type: ignore[attr-defined]
        logging.setLogRecordFactory(factory)
