"""The structured pool: members and targets (no adapter sees an OOD target), target examples, and a tiny
build that registers adapters with their convergence numbers and resumes without retraining."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from experts.data.synthetic import SHUFFLED
from experts.errors import InvalidExpertError
from experts.evo.task_pool import (
    MEMBERS,
    QUICK,
    TARGETS,
    Member,
    adapter_id,
    build_task_pool,
    check_members,
    target_examples,
)
from experts.runtime import open_repository


def test_the_pool_has_twenty_adapters_with_every_role():
    roles = [m.role for m in MEMBERS]
    assert len(MEMBERS) >= 20 and len({m.task for m in MEMBERS}) == len(MEMBERS)
    assert {"member", "auxiliary", "synergistic", "irrelevant", "distractor"} <= set(roles)
    assert all(m.task.endswith(SHUFFLED) for m in MEMBERS if m.role == "distractor")
    check_members(MEMBERS)


def test_no_adapter_may_train_on_an_unseen_target():
    with pytest.raises(InvalidExpertError, match="rev/digits"):
        check_members((*MEMBERS, Member("rev/digits", "member")))


def test_a_multi_task_target_interleaves_its_tasks():
    ex = target_examples("mix3", "validation", 300)
    tags = [e["prompt"][:3] for e in ex]
    assert len(ex) == 300 and tags[:3] == ["rv:", "st:", "sh:"]
    assert {t: tags.count(t) for t in set(tags)} == {"rv:": 100, "st:": 100, "sh:": 100}
    assert len(TARGETS["mix3"]) == 3


def test_validation_and_test_inputs_are_disjoint():
    val = {e["prompt"] for e in target_examples("rev/digits", "validation", 300)}
    test = {e["prompt"] for e in target_examples("rev/digits", "test", 500)}
    assert len(val) == 300 and len(test) == 500 and not val & test


def test_adapter_ids():
    assert adapter_id("p", "rev/lower" + SHUFFLED) == "p-rev-lower-shuf"


def test_a_tiny_build_registers_and_resumes(tmp_path):
    cfg = replace(QUICK, base_examples_per_task=20, val_examples=8,
                  base_budget=replace(QUICK.base_budget, max_tokens=20 * 16 * 17),
                  adapter_budget=replace(QUICK.adapter_budget, max_tokens=8 * 16 * 17))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many short OpenMP regions stall on a busy machine
    try:
        _build_and_check(tmp_path, cfg)
    finally:
        torch.set_num_threads(threads)


def _build_and_check(tmp_path, cfg) -> None:
    members = (Member("rev/lower", "member"), Member("rev/upper" + SHUFFLED, "distractor"))
    lines: list[str] = []
    first = build_task_pool(tmp_path, config=cfg, members=members, prefix="t", echo=lines.append)
    assert first["adapters"] == ["t-rev-lower", "t-rev-upper-shuf"] and first["trained"] == 2
    assert any("exact match" in line for line in lines)
    again = build_task_pool(tmp_path, config=cfg, members=members, prefix="t", echo=lines.append)
    assert again["trained"] == 0 and again["adapters"] == first["adapters"]
    repo = open_repository(tmp_path, database_url=f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        train = repo.record("t-rev-lower").lineage["train"]
        assert train["val_examples"] == 8 and 0.0 <= train["final_val_exact"] <= 1.0
        assert train["val_history"] and train["final_val_loss"] < train["initial_val_loss"]
        assert "role:distractor" in repo.record("t-rev-upper-shuf").tags
    finally:
        repo.close()
