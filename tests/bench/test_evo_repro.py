"""bench/evo_repro.py --quick end to end: every method on every task with finite test scores, budgets
respected, validation and test disjoint, and the reported test losses equal the provider's own (a fresh
session)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import evo_repro


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("evo-repro")
    threads = torch.get_num_threads()
    try:
        args = ["--quick", "--data-dir", str(root / "data"), "--out", str(root / "out.json")]
        result = evo_repro.main(args)
    finally:
        torch.set_num_threads(threads)
    return root, result


def test_every_method_every_task(quick):
    root, result = quick
    assert json.loads((root / "out.json").read_text())["tasks"].keys() == result["tasks"].keys()
    assert len(result["tasks"]) >= 3 and result["pool"]["adapters"] and len(result["pool"]["adapters"]) >= 20
    for task, r in result["tasks"].items():
        assert set(r["methods"]) == set(evo_repro.METHODS), task
        assert r["splits"]["validation&test"] == 0 and r["splits"]["test&train"] == 0
        for name, m in r["methods"].items():
            assert math.isfinite(m["test_loss"]) and math.isfinite(m["val_loss"]), (task, name)
            assert 0.0 <= m["token_acc"] <= 1.0 and 0.0 <= m["exact"] <= 1.0


def test_budgets(quick):
    _, result = quick
    budget = result["settings"]["budget"]
    for r in result["tasks"].values():
        for name, m in r["methods"].items():
            assert m["queries"] <= budget, name
        for name in ("evo_merging", "lorahub", "no_denoise", "no_scale", "no_negative"):
            assert r["methods"][name]["queries"] == budget, name  # the searches spend exactly the budget


def test_test_losses_match_the_provider(quick):
    """The bench's white-box test loss of uniform average = a fresh merge session's loss on the test split."""
    from experts.btm.operations import BTM
    from experts.evo.pool import QUICK
    from experts.evo.sessions import LossOptions, MergeSessionManager, ValidationSpec
    from experts.runtime import open_repository

    root, result = quick
    st = result["settings"]
    data = root / "data"
    repo = open_repository(data, database_url=f"sqlite:///{data / 'registry.db'}", max_loaded_models=2,
                           max_loaded_bytes=1 << 30)
    try:
        mgr = MergeSessionManager(repo, btm=BTM(repo, data, QUICK.corpus_bytes))
        loss = LossOptions(max_tokens_per_example=st["max_tokens"], batch_tokens=st["batch_tokens"])
        pool = result["pool"]["adapters"]
        n = len(pool)
        for task, r in result["tasks"].items():
            spec = ValidationSpec(task=task, split="test", max_examples=st["test_examples"])
            s = mgr.create(result["pool"]["base"], pool, spec, loss=loss)
            direct = s.evaluate([1.0] * n, [1.0 / n] * n)
            assert r["methods"]["uniform"]["test_loss"] == pytest.approx(direct, rel=1e-5, abs=1e-6), task
            for name, m in r["methods"].items():
                if "session_gap" in m:
                    assert m["session_gap"] < 1e-4, (task, name)
            mgr.delete(s.id)
    finally:
        repo.close()
