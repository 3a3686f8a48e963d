"""Building, storing and loading corpora: budgeted selection, deterministic splits, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from .errors import CorpusExistsError, InvalidCorpusError, UnknownCorpusError
from .sources import DOMAINS, _clean, _domain, extract_documents

SPLITS = ("train", "validation", "test")
SEPARATOR = "\n\n"
DEFAULT_MAX_BYTES = 2_000_000
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
FORMAT_VERSION = 1
HELD_OUT = 0.05  # share of the bytes in each of validation and test


@dataclass(frozen=True)
class CorpusInfo:
    name: str
    kind: Literal["builtin", "user"]
    source: str
    source_version: str
    path: Path  # the corpus folder
    max_bytes: int | None
    documents: dict[str, int]
    split_bytes: dict[str, int]
    sha256: dict[str, str]
    created_at: str

    @property
    def total_bytes(self) -> int:
        return sum(self.split_bytes.values())

    def split_path(self, split: str) -> Path:
        return self.path / f"{_check_split(split)}.txt"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidCorpusError(
            f"invalid corpus name {name!r}: use 1-64 characters a-z, 0-9, '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise InvalidCorpusError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _rank(name: str, key: str) -> bytes:
    return hashlib.sha256(f"{name}/{key}".encode()).digest()


def _assign_splits(name: str, keys: list[str], sizes: list[int],
                   shares: tuple[float, float] = (HELD_OUT, HELD_OUT)) -> dict[str, list[int]]:
    """Held-out splits take whole key groups in a stable hash order until each holds its share of the bytes
    (`shares`: validation, test; HELD_OUT each by default).

    A group more than twice the target is passed over (unless nothing smaller exists), and at least one
    group is always left for train. Needs at least three groups.
    """
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    gsize = {k: sum(sizes[i] for i in idx) for k, idx in groups.items()}
    ranked = sorted(groups, key=lambda k: _rank(name, k))
    taken: dict[str, str] = {}
    for split, keep, share in (("validation", 2, shares[0]), ("test", 1, shares[1])):  # keep: groups left
        target = share * sum(sizes)
        small_exists = any(v <= 2 * target for v in gsize.values())
        got = 0
        for k in ranked:
            if got >= target or len(groups) - len(taken) <= keep:
                break
            if k in taken or (got + gsize[k] > 2 * target and (got or small_exists)):
                continue
            taken[k] = split
            got += gsize[k]
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for k, idx in groups.items():
        parts[taken.get(k, "train")].extend(idx)
    return parts


def _make_splits(
    name: str, docs: list[tuple[str, str]], max_bytes: int | None,
    shares: tuple[float, float] = (HELD_OUT, HELD_OUT),
) -> tuple[dict[str, bytes], dict[str, int]]:
    """Pick ``(split key, text)`` documents under the budget; return the split files and document counts."""
    encoded = [d.encode("utf-8") for _, d in docs]
    if max_bytes is None:
        chosen = list(range(len(docs)))
    else:
        order = list(range(len(docs)))
        random.Random(f"mergegate-corpus/{name}").shuffle(order)
        chosen, used = [], 0
        for i in order:  # every document costs its bytes plus a separator or the final newline
            cost = len(encoded[i]) + len(SEPARATOR)
            if used + cost <= max_bytes:
                chosen.append(i)
                used += cost
        chosen.sort()
    if len(chosen) < 3:
        raise InvalidCorpusError(
            f"corpus {name!r} too small: {len(chosen)} document(s) fit, at least 3 are needed "
            "(one each for train, validation and test)"
        )
    keys = [docs[i][0] for i in chosen]
    if len(set(keys)) < 3:  # too few groups to hold out whole ones: split by document
        keys = [str(i) for i in chosen]
    parts = _assign_splits(name, keys, [len(encoded[i]) for i in chosen], shares)
    sep = SEPARATOR.encode()
    files = {s: sep.join(encoded[chosen[j]] for j in sorted(parts[s])) + b"\n" for s in SPLITS}
    return files, {s: len(parts[s]) for s in SPLITS}


def _meta_path(root: Path, name: str) -> Path:
    return Path(root) / _check_name(name) / "meta.json"


def _info_from_meta(path: Path, meta: dict) -> CorpusInfo:
    return CorpusInfo(
        name=meta["name"], kind=meta["kind"], source=meta["source"], source_version=meta["source_version"],
        path=path.parent, max_bytes=meta["max_bytes"], documents=dict(meta["documents"]),
        split_bytes=dict(meta["bytes"]), sha256=dict(meta["sha256"]), created_at=meta["created_at"],
    )


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        return None
    if not all((path.parent / f"{s}.txt").is_file() for s in SPLITS):
        return None
    return meta


def _write_corpus(folder: Path, files: dict[str, bytes], counts: dict[str, int], **meta) -> CorpusInfo:
    folder.mkdir(parents=True, exist_ok=True)
    for split, data in files.items():
        _write_atomic(folder / f"{split}.txt", data)
    meta.update(
        format_version=FORMAT_VERSION, documents=counts,
        bytes={s: len(d) for s, d in files.items()},
        sha256={s: hashlib.sha256(d).hexdigest() for s, d in files.items()},
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    _write_atomic(folder / "meta.json", (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return _info_from_meta(folder / "meta.json", meta)


def build_corpus(name: str, root: Path | str, max_bytes: int = DEFAULT_MAX_BYTES, *,
                 validation_share: float = HELD_OUT, test_share: float = HELD_OUT) -> CorpusInfo:
    """Extract up to ``max_bytes`` (all three splits together) of a built-in domain under ``root/name``;
    validation and test take about ``validation_share`` and ``test_share`` of the bytes (whole key groups).

    Idempotent: returns the existing corpus when its meta matches the budget, the shares and the source
    version.
    """
    shares = (float(validation_share), float(test_share))
    if not (0 < shares[0] and 0 < shares[1] and sum(shares) < 1):
        raise InvalidCorpusError(f"held-out shares must be positive and sum to less than 1, got {shares}")
    domain = _domain(name)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise InvalidCorpusError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    version = domain.version()
    meta_path = _meta_path(Path(root), name)
    meta = _read_meta(meta_path)
    if meta and meta.get("kind") == "builtin" and meta.get("max_bytes") == max_bytes \
            and meta.get("source_version") == version \
            and tuple(meta.get("held_out", (HELD_OUT, HELD_OUT))) == shares:
        return _info_from_meta(meta_path, meta)
    files, counts = _make_splits(name, extract_documents(name), max_bytes, shares)
    extra = {} if shares == (HELD_OUT, HELD_OUT) else {"held_out": list(shares)}
    return _write_corpus(meta_path.parent, files, counts, name=name, kind="builtin", source=domain.source,
                         source_version=version, max_bytes=max_bytes, **extra)


def get_corpus(root: Path | str, name: str) -> CorpusInfo:
    meta_path = _meta_path(Path(root), name)
    meta = _read_meta(meta_path)
    if meta is None:
        hint = " (a built-in domain: call build_corpus first)" if name in DOMAINS else ""
        raise UnknownCorpusError(f"corpus {name!r} is not built under {root}{hint}")
    return _info_from_meta(meta_path, meta)


def load_split(root: Path | str, name: str, split: str) -> str:
    _check_split(split)
    return get_corpus(root, name).split_path(split).read_text(encoding="utf-8")


def list_corpora(root: Path | str) -> list[CorpusInfo]:
    """Every built corpus (built-in and user) under ``root``, sorted by name."""
    out = []
    root = Path(root)
    if root.is_dir():
        for meta_path in sorted(root.glob("*/meta.json")):
            if NAME_RE.match(meta_path.parent.name) and (meta := _read_meta(meta_path)):
                out.append(_info_from_meta(meta_path, meta))
    return out


def _parse_user_documents(data: bytes, fmt: str, text_field: str) -> list[tuple[str, str]]:
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidCorpusError("corpus data must be bytes")
    try:
        text = bytes(data).decode("utf-8-sig")  # strict; a leading BOM is dropped
    except UnicodeDecodeError as e:
        raise InvalidCorpusError(f"corpus is not valid UTF-8 (bad byte at offset {e.start})") from None
    if fmt == "text":
        text = _clean(text)
        docs = [d for d in map(_clean, re.split(r"\n[ \t]*\n", text)) if d]
        if 0 < len(docs) < 3:  # fewer than three paragraphs: split by lines instead
            docs = [d for d in map(_clean, text.split("\n")) if d]
    elif fmt == "jsonl":
        docs = []
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON may hold a raw U+2028
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise InvalidCorpusError(f"line {n}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise InvalidCorpusError(
                    f"line {n}: expected a JSON object with a string field {text_field!r}"
                )
            if doc := _clean(obj[text_field]):
                docs.append(doc)
    else:
        raise InvalidCorpusError(f"unknown format {fmt!r}; expected 'text' or 'jsonl'")
    if not docs:
        raise InvalidCorpusError("corpus is empty: it holds no text")
    return [(str(i), d) for i, d in enumerate(dict.fromkeys(docs))]  # exact duplicates dropped


def add_user_corpus(root: Path | str, name: str, data: bytes, fmt: Literal["text", "jsonl"] = "text",
                    text_field: str = "text", *, overwrite: bool = False) -> CorpusInfo:
    """Store an uploaded corpus as domain ``name``; everything is validated before anything is written.

    ``text``: documents are paragraphs (blank-line separated), or lines when there are fewer than three
    paragraphs. ``jsonl``: one JSON object per line, the document in ``text_field``; blank lines skipped.
    """
    _check_name(name)
    if name in DOMAINS:
        raise InvalidCorpusError(f"{name!r} is a built-in domain; choose another name")
    folder = Path(root) / name
    if not overwrite and _read_meta(folder / "meta.json") is not None:
        raise CorpusExistsError(f"corpus {name!r} exists already")
    files, counts = _make_splits(name, _parse_user_documents(data, fmt, text_field), None)
    created = not folder.exists()
    try:
        return _write_corpus(folder, files, counts, name=name, kind="user", source=f"upload ({fmt})",
                             source_version="user", max_bytes=None)
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
