"""MERGEGATE_RUNNER=ray for searches: a generation split across 2 Ray actors (each holding the base and the
pool) gives the local session's losses and stops between generations when cancelled. The search job on
Ray (the gateway's wiring, the winner's registration): tests/app/test_runner_settings.py."""

from __future__ import annotations

import random

import pytest

from experts.btm.operations import BTM
from experts.evo.ray_provider import RayProvider, split
from experts.evo.search_job import LocalProvider
from experts.evo.sessions import BudgetExhaustedError, MergeSessionManager
from experts.runtime import open_repository
from merging.search import run_method
from merging.search.settings import SearchSettings
from tests.helpers import build_adapter_dir

TARGETS = ("c_attn", "c_proj", "c_fc")
EXAMPLES = [
    {"prompt": "def add(a, b):\n", "completion": "    return a + b"},
    {"prompt": "Lists are", "completion": " mutable sequences, typically used to store collections of items."},
    {"text": "The with statement wraps the execution of a block with methods defined by a context manager."},
    {"prompt": "for i in range(10):\n", "completion": "    print(i)"},
]
BODY = {"base": "tiny", "pool": ["ad0", "ad1", "ad2"], "validation": {"examples": EXAMPLES}}


@pytest.fixture(scope="module")
def manager(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("raysearch")
    repo = open_repository(root / "data", max_loaded_models=4, max_loaded_bytes=1 << 30)
    repo.register_from_dir("tiny", tiny_model_dir)
    for i in range(3):
        repo.register_from_dir(f"ad{i}", build_adapter_dir(root / "src" / f"ad{i}", tiny_model_dir, seed=i,
                                                           targets=TARGETS), base="tiny")
    yield MergeSessionManager(repo, btm=BTM(repo, root / "data", corpus_bytes=100_000))
    repo.close()


@pytest.fixture(scope="module")
def ray_provider(manager, ray_runner):
    return RayProvider(manager, ray_runner, workers=2)


def population(n: int, size: int, seed: int = 0) -> list[tuple[list[float], list[float]]]:
    rng = random.Random(seed)
    return [([rng.uniform(0, 1) for _ in range(n)], [rng.uniform(-1.5, 1.5) for _ in range(n)])
            for _ in range(size)]


def test_a_generation_on_two_actors_gives_the_local_losses(manager, ray_provider):
    pairs = population(3, 20)
    local, local_view = LocalProvider(manager).open({**BODY, "budget": 100})
    ray, view = ray_provider.open({**BODY, "budget": 21})
    try:
        assert view["runner"] == {"name": "ray", "actors": 2}
        assert view["n"] == local_view["n"] == 3 and view["experts"] == local_view["experts"]
        assert view["validation"]["scored_tokens"] == local_view["validation"]["scored_tokens"]
        expected = [local.evaluate(a, b) for a, b in pairs]
        assert ray.evaluate_many(pairs) == pytest.approx(expected, abs=1e-5)
        assert ray.evaluate(*pairs[7]) == pytest.approx(expected[7], abs=1e-5)
        with pytest.raises(BudgetExhaustedError):  # 21 queries spent: the next population does not fit
            ray.evaluate_many(pairs[:2])
        ray.budget = 200
        calls = []

        def should_stop() -> bool:  # two generations, then a cancel
            calls.append(1)
            return len(calls) > 2

        stopped = run_method(ray, 3, SearchSettings(method="evo_merging", budget_stage1=40, budget_stage2=40,
                                                    popsize=4), should_stop=should_stop)
        assert stopped.stopped and stopped.queries == 8
    finally:
        manager.close()
        ray_provider.close(view["id"])
    assert split(list(range(5)), 2) == [[0, 1, 2], [3, 4]] and split([1], 1) == [[1]]
