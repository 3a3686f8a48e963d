"""A merge session's population as rows of batched forwards (candidates x examples): the same losses as the
per-candidate path (the reference), the same query accounting, steps that interleave with single queries,
memory-bounded groups, and the per-candidate path kept where the batched one does not apply (peft mode)."""

from __future__ import annotations

import pytest
import torch

from experts.data.scoring import masked_ce_sum, masked_ce_sums
from experts.evo.batched import BatchedRun
from experts.evo.sessions import (
    BudgetExhaustedError,
    InvalidCandidateError,
    LossOptions,
    MergeSessionManager,
    ValidationSpec,
)
from experts.runtime import open_repository
from tests.helpers import build_adapter_dir

TARGETS = ("c_attn", "c_proj", "c_fc")
N = 4
TEXTS = ["The with statement wraps the execution of a block with methods defined by a context manager.",
         "Lists are mutable sequences, typically used to store collections of homogeneous items.",
         "A tuple is an immutable sequence.", "Dictionaries map hashable keys to arbitrary objects.",
         "def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
         "The import statement finds a module, loads and initialises it if necessary.",
         "Exceptions are raised by the raise statement and handled by try."]
EXAMPLES = tuple({"text": t} for t in TEXTS) + (
    {"prompt": "def mul(a, b):\n", "completion": "    return a * b"},
    {"prompt": "", "completion": "import os"},
)
# small padded batches and forwards, so a population spans several batches and several groups
LOSS = LossOptions(batch_tokens=64)


def cands(k: int, seed: int = 0) -> list[tuple[list[float], list[float]]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(N, generator=g).tolist(), (torch.rand(N, generator=g) * 3 - 1.5).tolist()) for _ in range(k)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mgr(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("batched")
    repo = open_repository(root / "data", database_url=f"sqlite:///{root / 'r.db'}", max_loaded_models=4,
                           max_loaded_bytes=1 << 30)
    repo.register_from_dir("tiny", tiny_model_dir)
    for i in range(N):
        d = build_adapter_dir(root / "src" / f"ad{i}", tiny_model_dir, seed=i, targets=TARGETS)
        repo.register_from_dir(f"ad{i}", d, base="tiny", tags=["pool"])
    yield MergeSessionManager(repo, max_sessions=16)
    repo.close()


def session(mgr, *, mode: str = "dense", budget: int = 1000, forward_tokens: int = 200):
    s = mgr.create("tiny", {"tags": ["pool"]}, ValidationSpec(examples=EXAMPLES), loss=LOSS, budget=budget, mode=mode)
    s.forward_tokens = forward_tokens
    return s


def test_batched_losses_equal_the_per_candidate_path(mgr):
    s = session(mgr)
    assert s.batched and len(s.batches) >= 3
    pop = cands(7)
    run = BatchedRun(s, pop)
    assert len(run.groups) >= 2 and sum(len(g) for g in run.groups) == 7
    assert len(run) == len(run.groups) * len(s.batches)
    ref = s.evaluate_many(pop, batched=False)
    got = s.evaluate_many(pop)
    assert max(abs(a - b) for a, b in zip(ref, got, strict=True)) < 1e-5  # float32; the target is 1e-4
    assert got == s.evaluate_many(pop)  # the same population, the same numbers
    assert len(set(got)) == 7  # the candidates really differ
    # a single query is the per-candidate path; before and after a population it answers the same
    one = s.evaluate(*pop[2])
    assert one == ref[2]
    # beta = 0 everywhere: the bare base, batched
    zero = s.evaluate_many([([1.0] * N, [0.0] * N)] * 3)
    assert max(abs(z - s.evaluate([1.0] * N, [0.0] * N)) for z in zero) < 1e-6


def test_groups_are_bounded_by_forward_tokens_and_balanced(mgr):
    s = session(mgr, forward_tokens=1)
    widest = max(b.ids.numel() for b in s.batches)
    assert [len(g) for g in BatchedRun(s, cands(3)).groups] == [1, 1, 1]  # at least one candidate per forward
    s.forward_tokens = 3 * widest
    sizes = [len(g) for g in BatchedRun(s, cands(7)).groups]
    assert sizes == [3, 2, 2] and max(sizes) * widest <= s.forward_tokens
    s.forward_tokens = 10**9
    assert [len(g) for g in BatchedRun(s, cands(7)).groups] == [7]
    assert s.evaluate_many(cands(5), batched=True) == pytest.approx(s.evaluate_many(cands(5), batched=False),
                                                                    abs=1e-5)


def test_budget_accounting_is_unchanged(mgr):
    s = session(mgr, budget=10)
    s.evaluate_many(cands(4))
    assert (s.used, s.remaining) == (4, 6)
    s.evaluate_many(cands(4), batched=False)
    assert s.used == 8
    with pytest.raises(BudgetExhaustedError):
        s.evaluate_many(cands(3))  # does not fit: nothing counted, nothing run
    assert s.used == 8
    with pytest.raises(InvalidCandidateError):
        s.evaluate_many(cands(1) + [([2.0] * N, [0.0] * N)])  # alpha out of range: refused before counting
    assert s.used == 8
    s.evaluate_many(cands(2))
    assert s.remaining == 0


def test_a_failure_mid_run_refunds_the_candidates_not_evaluated(mgr, monkeypatch):
    s = session(mgr, budget=20)
    widest = max(b.ids.numel() for b in s.batches)
    s.forward_tokens = 2 * widest  # groups of 2: [0, 1], [2, 3], [4, 5]
    real, calls = s.batched_sums, []

    def flaky(stacks, batch):
        calls.append(1)
        if len(calls) == len(s.batches) + 1:  # the first step of the second group
            raise RuntimeError("boom")
        return real(stacks, batch)

    monkeypatch.setattr(s, "batched_sums", flaky)
    with pytest.raises(RuntimeError):
        s.evaluate_many(cands(6))
    assert s.used == 2  # the first group was evaluated; the other four queries are given back


def test_steps_interleave_with_single_queries(mgr):
    """The gateway runs a population one forward per torch hop; a single query between two hops leaves a
    merged W in the dense modules, which the next step puts back to W0."""
    s = session(mgr)
    pop = cands(5, seed=3)
    ref = s.evaluate_many(pop)
    with s.population(pop) as p:
        assert p.run is not None
        while not p.done:
            p.step()
            s.evaluate(*cands(1, seed=9)[0])
        got = p.losses()
    assert got == ref
    assert s.used == 5 + 5 + len(p.run)


def test_peft_mode_keeps_the_per_candidate_path(mgr):
    dense, peft = session(mgr), session(mgr, mode="peft")
    assert not peft.batched and peft.batched_run(peft.check_candidates(cands(3))) is None
    pop = cands(3, seed=5)
    got = peft.evaluate_many(pop)
    assert peft.used == 3
    assert max(abs(a - b) for a, b in zip(got, dense.evaluate_many(pop), strict=True)) < 1e-5
    off = MergeSessionManager(mgr.repo, batched=False).create("tiny", {"tags": ["pool"]},
                                                              ValidationSpec(examples=EXAMPLES), loss=LOSS)
    assert not off.batched and off.evaluate_many(pop) == off.evaluate_many(pop, batched=False)


def test_masked_ce_sums_are_per_copy_sums(mgr):
    s = session(mgr)
    b = s.batches[0]
    with torch.inference_mode():
        one = float(masked_ce_sum(s._model, b))
        many = masked_ce_sums(s._model, b, 3)
        slow = masked_ce_sums(s._model, b, 2, fast=False)
    assert many.dtype == torch.float64 and many.tolist() == pytest.approx([one] * 3, rel=1e-6)
    assert slow.tolist() == pytest.approx([one] * 2, rel=1e-5)
