"""Structured tasks (experts.data.synthetic): answers, determinism, disjoint splits, shuffled labels."""

from __future__ import annotations

import pytest

from experts.data.datasets import load_task
from experts.data.synthetic import (
    SKILLS,
    is_synthetic,
    lookup_table,
    synthetic_examples,
    synthetic_task_names,
)
from experts.errors import InvalidExpertError


def _io(example: dict[str, str]) -> tuple[str, str, str]:
    tag, _, rest = example["prompt"].partition(":")
    assert rest.endswith("=") and example["completion"].endswith("\n")
    return tag, rest[:-1], example["completion"][:-1]


@pytest.mark.parametrize("name,check", [
    ("rev/digits", lambda x, y: y == x[::-1]),
    ("sort/upper", lambda x, y: y == "".join(sorted(x))),
    ("shift/lower", lambda x, y: all((ord(b) - ord(a)) % 26 == 1 for a, b in zip(x, y, strict=True))),
    ("swap/lower", lambda x, y: sorted(x) == sorted(y) and y[:2] == x[1::-1]),
    ("bin/number", lambda x, y: int(y, 2) == int(x)),
    ("capital/country", lambda x, y: lookup_table()[x] == y),
])
def test_answers_are_exact(name, check):
    for e in synthetic_examples(name, "validation", 50):
        tag, x, y = _io(e)
        assert tag == SKILLS[name.split("/")[0]].tag and check(x, y), e


def test_deterministic_prefixes_and_counts():
    a = synthetic_examples("rev/lower", "test", 300)
    assert a == synthetic_examples("rev/lower", "test", 300) == synthetic_examples("rev/lower", "test")[:300]
    assert len(synthetic_examples("sort/digits", "train")) == 20_000
    assert len({e["prompt"] for e in synthetic_examples("sort/digits", "validation", 500)}) == 500


def test_splits_are_disjoint_by_input_across_tasks():
    inputs = {split: {_io(e)[1] for t in ("rev/digits", "sort/digits", "evens/digits")
                      for e in synthetic_examples(t, split, 2000 if split == "train" else 500)}
              for split in ("train", "validation", "test")}
    assert not inputs["train"] & inputs["test"] and not inputs["train"] & inputs["validation"]
    assert not inputs["validation"] & inputs["test"]


def test_shuffled_labels_are_a_derangement_of_the_true_ones():
    true = synthetic_examples("rev/lower", "train", 400)
    shuf = synthetic_examples("rev/lower~shuf", "train", 400)
    assert [e["prompt"] for e in true] == [e["prompt"] for e in shuf]
    assert sorted(e["completion"] for e in true) == sorted(e["completion"] for e in shuf)
    assert sum(a["completion"] == b["completion"] for a, b in zip(true, shuf, strict=True)) <= 2


def test_names_and_load_task_without_corpora():
    names = synthetic_task_names()
    assert "rev/digits" in names and "capital/country" in names and not any("~" in n for n in names)
    assert is_synthetic("rev/digits~shuf") and not is_synthetic("rev/number") and not is_synthetic("code_return")
    assert load_task(None, "rev/digits", "validation", 5) == synthetic_examples("rev/digits", "validation", 5)
    with pytest.raises(InvalidExpertError):
        load_task(None, "rev/number", "validation")
    with pytest.raises(InvalidExpertError):
        synthetic_examples("rev/digits", "dev")
