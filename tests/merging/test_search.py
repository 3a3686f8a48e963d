"""merging/search: Evo-Merging's two CMA-ES stages and LoraHub against synthetic providers.

The synthetic provider's loss is a separable quadratic with a known minimiser inside the
bounds, loss = |alpha - A*|^2 + |beta - B*|^2. Stage 1 searches alpha at beta = 1/N, stage 2
searches beta at alpha = stage 1's best (~A*); with the L1 term the optimum of each stage's
objective is shifted by the soft threshold l1 / (2N).
"""

from __future__ import annotations

import json
import math
import threading
import warnings

import numpy as np
import pytest

from merging.search import SearchSettingsError, Trial, evo_merging, lorahub

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

A_STAR = np.array([0.6, 0.3, 0.9, 0.7])
B_STAR = np.array([0.5, -0.4, 0.2, 0.8])
L1 = 0.05


def soft(x: np.ndarray, t: float) -> np.ndarray:
    return np.sign(x) * np.maximum(np.abs(x) - t, 0.0)


class Quadratic:
    """Counts every evaluated candidate; optional ``evaluate_many`` records population sizes."""

    def __init__(self, a_star: np.ndarray = A_STAR, b_star: np.ndarray = B_STAR) -> None:
        self.a_star, self.b_star = a_star, b_star
        self.n = len(a_star)
        self.seen: list[tuple[tuple[float, ...], tuple[float, ...]]] = []
        self._lock = threading.Lock()

    def loss(self, alpha, beta) -> float:
        da, db = np.asarray(alpha) - self.a_star, np.asarray(beta) - self.b_star
        return float(np.sum(da**2) + np.sum(db**2))

    def evaluate(self, alpha, beta) -> float:
        assert all(isinstance(v, float) for v in [*alpha, *beta])
        with self._lock:
            self.seen.append((tuple(alpha), tuple(beta)))
        return self.loss(alpha, beta)


class BatchQuadratic(Quadratic):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.batches: list[int] = []

    def evaluate_many(self, candidates):
        self.batches.append(len(candidates))
        return [self.evaluate(a, b) for a, b in candidates]


@pytest.mark.parametrize("seed", [0, 1])
def test_evo_merging_finds_the_known_optimum(seed: int) -> None:
    q = Quadratic()
    r = evo_merging(q, 4, budget_stage1=400, budget_stage2=400, seed=seed)
    n = len(A_STAR)
    np.testing.assert_allclose(r.alpha, A_STAR - L1 / (2 * n), atol=0.08)
    np.testing.assert_allclose(r.beta, soft(B_STAR, L1 / (2 * n)), atol=0.04)
    assert r.queries == len(q.seen) == 800
    assert math.isclose(r.loss, q.loss(r.alpha, r.beta))
    assert math.isclose(r.objective, r.loss + L1 * np.mean(np.abs(r.beta)))
    assert [s.stage for s in r.stages] == ["denoise", "scale"]
    assert r.stage("denoise").objective > r.stage("scale").objective  # beta = 1/N is far from B*


def test_lorahub_ngopt_finds_a_per_adapter_quadratic_optimum() -> None:
    q = Quadratic(a_star=np.ones(4))  # LoraHub keeps alpha = 1
    r = lorahub(q, 4, seed=0, lorahub_loss="token_mean")
    assert r.queries == len(q.seen) == 40
    assert all(a == (1.0,) * 4 for a, _ in q.seen)
    assert q.seen[0][1] == (0.0,) * 4  # LoraHub starts from the base model (w = 0)
    np.testing.assert_allclose(r.beta, soft(B_STAR, L1 / 8), atol=0.02)
    assert r.settings["optimizer"] == "NGOpt" and r.stages[0].stage == "lorahub"
    assert isinstance(r.settings["stages"]["lorahub"]["selected"], str)  # NGOpt's pick (1.0.12: Cobyla)


def test_lorahub_at_a_large_budget_runs_where_ngopt_picks_a_metamodel() -> None:
    """NGOpt picks a MetaModel at these budgets; with numpy >= 2.4 nevergrad 1.0.12 crashes there
    (float() of a 1-element array), hence the numpy pin in pyproject.toml."""
    b_star = np.array([0.5, -0.4, 0.2, 0.8, -0.6])
    q = Quadratic(a_star=np.ones(5), b_star=b_star)
    r = lorahub(q, 5, budget=400, seed=0, lorahub_loss="token_mean")
    assert r.queries == 400 and "MetaModel" in r.settings["stages"]["lorahub"]["selected"]
    np.testing.assert_allclose(r.beta, soft(b_star, L1 / 10), atol=0.05)


def test_lorahub_per_example_loss_divides_the_loss_by_its_batch_size() -> None:
    """LoraHub's default_get_loss: objective = loss / batch size + l1 * mean|beta|, so the L1 term
    shrinks the optimum batch-size times harder; the reported loss stays the evaluator's."""
    q = Quadratic(a_star=np.ones(4))
    r = lorahub(q, 4, budget=200, seed=0, lorahub_batch_size=5)  # per_example is the default
    assert r.settings["lorahub_loss"] == "per_example" and r.settings["loss_scale"] == 0.2
    assert math.isclose(r.loss, q.loss(r.alpha, r.beta))
    assert math.isclose(r.objective, r.loss / 5 + L1 * np.mean(np.abs(r.beta)))
    np.testing.assert_allclose(r.beta, soft(B_STAR, 5 * L1 / 8), atol=0.03)


def test_first_generation_has_the_intended_spread() -> None:
    """sigma0 = 0.05 in value units: full spread from the interior start of stage 2, and pycma's
    own fold at the bound for stage 1 (x0 = 1 on alpha's upper bound)."""
    import cma

    n = 20
    trials: list[Trial] = []
    evo_merging(Quadratic(np.full(n, 0.8), np.zeros(n)), n, budget_stage1=20, budget_stage2=20, seed=3,
                on_trial=trials.append)
    alphas = np.array([t.alpha for t in trials if t.stage == "denoise"])  # (20, N)
    betas = np.array([t.beta for t in trials if t.stage == "scale"])
    assert alphas.shape == betas.shape == (20, n)
    spread = betas.std(axis=0)
    assert 0.02 < spread.mean() < 0.1 and spread.min() > 0.02 and spread.max() < 0.1
    assert abs(betas.mean() - 1 / n) < 0.02
    # stage 1: inside [0, 1], folded below 1, as pycma with bounds=[0, 1] does
    assert alphas.max() <= 1.0 and alphas.min() > 0.8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opts = {"popsize": 20, "bounds": [0, 1], "verbose": -9, "seed": np.nan,
                "randn": np.random.RandomState(0).randn}
        es = cma.CMAEvolutionStrategy(np.ones(n), 0.05, opts)
    ref = np.array(es.ask())
    assert abs(alphas.mean() - ref.mean()) < 0.005
    assert 0.6 < alphas.std(axis=0).mean() / ref.std(axis=0).mean() < 1.6


def test_best_ever_is_tracked_and_never_worse_than_any_evaluated() -> None:
    rng = np.random.default_rng(0)
    bumps = rng.normal(size=4)

    class Bumpy(Quadratic):  # multimodal: the CMA mean is not the best point
        def loss(self, alpha, beta):
            bump = np.sin(25 * np.dot(bumps, np.asarray(beta) + alpha))
            return super().loss(alpha, beta) + 0.05 * float(bump)

    trials: list[Trial] = []
    r = evo_merging(Bumpy(), 4, budget_stage1=60, budget_stage2=100, seed=5, on_trial=trials.append)
    objectives = [t.objective for t in trials]
    assert r.objective == min(objectives)
    best = trials[int(np.argmin(objectives))]
    assert (r.alpha, r.beta, r.loss) == (best.alpha, best.beta, best.loss)
    for i, t in enumerate(trials):
        assert t.best_objective == min(objectives[: i + 1]) and t.index == i
    assert [h.best_objective for h in r.history] == [t.best_objective for t in trials]
    for s in r.stages:
        assert s.objective == min(t.objective for t in trials if t.stage == s.stage)
    # stage 2 runs at stage 1's best alpha
    assert all(t.alpha == r.stage("denoise").alpha for t in trials if t.stage == "scale")


def test_selection_last_stage_takes_stage_two_best_even_when_worse() -> None:
    q = Quadratic(b_star=np.full(4, 0.25))  # beta = 1/N is already optimal for the loss
    shared = evo_merging(q, 4, budget_stage1=40, budget_stage2=40, seed=0, l1=1.0)
    last = evo_merging(q, 4, budget_stage1=40, budget_stage2=40, seed=0, l1=1.0, selection="last_stage")
    s1, s2 = last.stage("denoise"), last.stage("scale")
    assert (last.alpha, last.beta, last.objective) == (s2.alpha, s2.beta, s2.objective)
    best = min((s1, s2), key=lambda s: s.objective)
    assert (shared.alpha, shared.beta, shared.objective) == (best.alpha, best.beta, best.objective)


@pytest.mark.parametrize("batch", [False, True])
def test_budgets_are_respected_exactly(batch: bool) -> None:
    q = BatchQuadratic() if batch else Quadratic()
    r = evo_merging(q, 4, budget_stage1=45, budget_stage2=33, seed=0)
    assert len(q.seen) == r.queries == len(r.history) == 78
    stages = [(s.queries, s.generations, s.stop_reason) for s in r.stages]
    assert stages == [(45, 3, "budget"), (33, 2, "budget")]
    if batch:
        assert q.batches == [20, 20, 5, 20, 13]
    q2 = Quadratic()
    assert lorahub(q2, 4, budget=7, seed=0).queries == len(q2.seen) == 7


def test_should_stop_stops_promptly() -> None:
    q = Quadratic()
    r = evo_merging(q, 4, seed=0, should_stop=lambda: len(q.seen) >= 7)
    assert len(q.seen) == r.queries == 7 and r.stopped
    assert [(s.stage, s.stop_reason) for s in r.stages] == [("denoise", "should_stop")]
    assert r.stage("denoise").objective == r.objective < math.inf

    qb = BatchQuadratic()  # a population is one call: stops at the next generation boundary
    r = evo_merging(qb, 4, seed=0, should_stop=lambda: len(qb.seen) >= 7)
    assert len(qb.seen) == 20 and r.stopped

    qp = Quadratic()  # thread pool: nothing new starts once it fires
    r = evo_merging(qp, 4, seed=0, workers=4, should_stop=lambda: len(qp.seen) >= 7)
    assert 7 <= len(qp.seen) <= 7 + 4 and r.queries == len(qp.seen) and r.stopped

    q0 = Quadratic()
    r = evo_merging(q0, 4, seed=0, should_stop=lambda: True)
    assert q0.seen == [] and r.queries == 0 and r.stopped and r.alpha == (1.0,) * 4 and math.isnan(r.loss)


def test_same_seed_same_result_whatever_the_evaluation_mode() -> None:
    def run(seed: int, evaluator=None, workers: int = 1):
        return evo_merging(evaluator or Quadratic(), 4, budget_stage1=60, budget_stage2=60, seed=seed,
                           workers=workers, early_stop=2).to_dict()

    first = run(7)
    assert run(7) == first
    assert run(7, BatchQuadratic()) == first
    assert run(7, workers=4) == first
    assert run(8)["alpha"] != first["alpha"]
    json.dumps(first)
    assert first["settings"]["stages"]["denoise"]["optimizer"] == "ParametrizedCMA"
    assert lorahub(Quadratic(), 4, seed=3).to_dict() == lorahub(Quadratic(), 4, seed=3).to_dict()


def test_ablations_change_what_is_searched() -> None:
    n = 4
    q = Quadratic()
    r = evo_merging(q, n, budget_stage1=40, budget_stage2=60, seed=0, denoise=False)
    assert all(a == (1.0,) * n for a, _ in q.seen) and len(q.seen) == 60
    assert [s.stage for s in r.stages] == ["scale"] and r.alpha == (1.0,) * n

    q = Quadratic()
    r = evo_merging(q, n, budget_stage1=40, budget_stage2=60, seed=0, scale=False)
    assert all(b == (1 / n,) * n for _, b in q.seen) and len(q.seen) == 40
    assert [s.stage for s in r.stages] == ["denoise"] and r.beta == (1 / n,) * n

    q = Quadratic()
    evo_merging(q, n, budget_stage1=20, budget_stage2=200, seed=0, negative=False)
    betas = np.array([b for _, b in q.seen[20:]])
    assert betas.min() >= 0.0 and betas[:, 1].min() < 0.01  # B*[1] = -0.4: pushed onto the bound

    q = Quadratic()
    evo_merging(q, n, budget_stage1=20, budget_stage2=200, seed=0)
    assert np.array([b for _, b in q.seen[20:]])[:, 1].min() < -0.1

    with pytest.raises(SearchSettingsError):
        evo_merging(Quadratic(), n, denoise=False, scale=False)


def test_early_stop_on_plateau_and_cma_termination() -> None:
    class Flat(Quadratic):
        def loss(self, alpha, beta):  # improvements far below min_delta
            return 1.0 + 1e-9 * super().loss(alpha, beta)

    r = evo_merging(Flat(), 4, seed=0, l1=0.0, early_stop=3, early_stop_min_delta=1e-6)
    assert [(s.queries, s.stop_reason) for s in r.stages] == [(80, "plateau"), (80, "plateau")]

    class Constant(Quadratic):
        def loss(self, alpha, beta):
            return 1.0

    r = evo_merging(Constant(), 4, seed=0, l1=0.0)  # pycma stops on flat fitness, as es.stop() would
    assert all(s.stop_reason.startswith("cma_stop:") and s.queries < 400 for s in r.stages)


def test_edge_cases_and_validation() -> None:
    one = Quadratic(np.array([0.5]), np.array([0.7]))
    r = evo_merging(one, 1, budget_stage1=40, budget_stage2=40, seed=0)
    assert len(r.alpha) == len(r.beta) == 1 and r.queries == 80

    class Nan(Quadratic):
        def loss(self, alpha, beta):
            return math.nan if alpha[0] > 0.97 else super().loss(alpha, beta)

    r = evo_merging(Nan(), 4, budget_stage1=40, budget_stage2=20, seed=0)
    assert math.isfinite(r.loss) and any(math.isnan(h.loss) for h in r.history)
    assert r.objective == min(h.objective for h in r.history)

    with pytest.raises(SearchSettingsError, match="n=4"):
        evo_merging(Quadratic(), 3)
    with pytest.raises(SearchSettingsError):
        evo_merging(Quadratic(), 4, popsize=1)
    with pytest.raises(SearchSettingsError):
        lorahub(Quadratic(), 4, optimizer="NoSuchOptimizer")


def test_baselines_evaluate_their_fixed_candidates_and_keep_the_best() -> None:
    from merging.search import baseline

    q = Quadratic(a_star=np.ones(4))  # loss = sum (beta - B_STAR)^2 with alpha = 1
    r = baseline(q, 4, "uniform")
    assert r.queries == 1 and q.seen == [((1.0,) * 4, (0.25,) * 4)]
    assert r.loss == pytest.approx(float(np.sum((0.25 - B_STAR) ** 2)))
    q = Quadratic(a_star=np.ones(4))
    r = baseline(q, 4, "task_arithmetic", lambdas=[0.0, 0.3, 1.0])
    # by hand: sum (lam - B*)^2 over B* = (0.5, -0.4, 0.2, 0.8): lam=0 -> 1.09, 0.3 -> 0.79, 1 -> 2.89
    assert [b for _, b in q.seen] == [(0.0,) * 4, (0.3,) * 4, (1.0,) * 4]
    assert r.beta == (0.3,) * 4 and r.loss == pytest.approx(0.79) and r.objective == r.loss
    q = Quadratic(a_star=np.ones(4))
    r = baseline(q, 4, "best_single")
    # e_i: 1.09 - B*_i^2 + (1 - B*_i)^2 -> 1.09, 2.89, 1.69, 0.49: adapter 3 alone
    assert r.queries == 4 and r.beta == (0.0, 0.0, 0.0, 1.0) and r.loss == pytest.approx(0.49)
    with pytest.raises(SearchSettingsError):
        baseline(q, 4, "ties")
