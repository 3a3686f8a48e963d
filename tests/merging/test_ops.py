"""merging/ops.py against hand-computed cases on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from merging import ops

X = torch.tensor([0.5, -3.0, 2.0, -2.0, 1.0, 0.0])


@pytest.mark.parametrize(
    ("numel", "frac", "rule", "expected"),
    [
        (10, 0.25, "floor", 2),
        (10, 0.25, "round", 2),  # round(2.5) = 2: Python rounds half to even, like the authors' code
        (10, 0.35, "round", 4),  # round(3.5) = 4
        (10, 0.25, "ceil", 3),
        (10, 0.01, "round", 1),  # at least one entry for any fraction > 0
        (10, 0.01, "floor", 0),
        (10, 0.0, "round", 0),
        (10, 1.0, "floor", 10),
        (100, 0.29, "floor", 28),  # int(0.29 * 100) == 28 in float arithmetic, as in mergekit/peft
    ],
)
def test_keep_count(numel: int, frac: float, rule: ops.KeepRule, expected: int) -> None:
    assert ops.keep_count(numel, frac, rule) == expected


def test_magnitude_mask_keeps_ties_at_threshold() -> None:
    # density 0.5 -> k = 3: |x| = .5 3 2 2 1 0 -> threshold 2
    assert ops.magnitude_mask(X, 0.5).tolist() == [False, True, True, True, False, False]
    # density 0.34 -> k = int(2.04) = 2; the 2nd largest |x| is 2, tied with -2: both kept
    assert ops.magnitude_mask(X, 0.34).tolist() == [False, True, True, True, False, False]
    assert not ops.magnitude_mask(X, 0.0).any()
    assert ops.magnitude_mask(X, 1.0).all()


def test_magnitude_mask_count_without_ties() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for d in (0.1, 0.33, 0.5, 0.9):
        assert int(ops.magnitude_mask(x, d).sum()) == int(d * 1000)


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (0.25, [0, -3, 2, -2, 0, 0]),  # round(1.5) = 2 -> thr 2, tie kept
        (0.5, [0, -3, 2, -2, 0, 0]),  # round(3) = 3 -> thr 2
        (0.6, [0, -3, 2, -2, 1, 0]),  # round(3.6) = 4 -> thr 1
        (0.1, [0, -3, 0, 0, 0, 0]),  # round(0.6) = 1
        (0.01, [0, -3, 0, 0, 0, 0]),  # round(0.06) = 0 -> at least 1
        (0.0, [0, 0, 0, 0, 0, 0]),
        (1.0, [0.5, -3, 2, -2, 1, 0]),
    ],
)
def test_evo_sparsify_hand_cases(k: float, expected: list[float]) -> None:
    assert ops.evo_sparsify(X, k).tolist() == expected


def test_evo_sparsify_identity_dtype_and_no_rescale() -> None:
    assert ops.evo_sparsify(X, 1.0) is X
    xb = X.to(torch.bfloat16)
    out = ops.evo_sparsify(xb, 0.5)
    assert out.dtype == torch.bfloat16
    assert out.float().tolist() == [0, -3, 2, -2, 0, 0]  # kept entries are not rescaled
    assert ops.evo_sparsify(torch.empty(0), 0.5).numel() == 0


def test_random_mask_seeded_and_edges() -> None:
    x = torch.zeros(10_000)
    m1 = ops.random_mask(x, 0.3, generator=torch.Generator().manual_seed(1))
    m2 = ops.random_mask(x, 0.3, generator=torch.Generator().manual_seed(1))
    m3 = ops.random_mask(x, 0.3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert abs(m1.float().mean().item() - 0.3) < 0.02
    # same mask whatever the dtype of x
    assert torch.equal(m1, ops.random_mask(x.half(), 0.3, generator=torch.Generator().manual_seed(1)))
    assert ops.random_mask(x, 1.0, generator=None).all()
    assert not ops.random_mask(x, 0.0, generator=None).any()


def test_breadcrumbs_mask_hand_cases() -> None:
    x = torch.arange(1.0, 11.0)  # |x| = 1..10
    # keep 5, drop the top 1 -> values 5..9
    assert ops.breadcrumbs_mask(x, 0.5, 0.1).nonzero().flatten().tolist() == [4, 5, 6, 7, 8]
    # gamma 0 keeps the top entries (mergekit's slice would keep nothing here)
    assert ops.breadcrumbs_mask(-x, 0.5, 0.0).nonzero().flatten().tolist() == [5, 6, 7, 8, 9]
    # density 0.9 + gamma 0.2 > 1: n_top shrinks to 1 so that 9 entries stay
    assert ops.breadcrumbs_mask(x, 0.9, 0.2).nonzero().flatten().tolist() == list(range(9))
    assert ops.breadcrumbs_mask(x, 1.0, 0.5).all()
    assert not ops.breadcrumbs_mask(x, 0.0, 0.1).any()
    # ties at both boundaries are kept: 3,3,2,2,1,1 with keep 3 / drop 1 keeps every 3 and 2
    t = torch.tensor([1.0, 3.0, 2.0, -1.0, -3.0, -2.0])
    assert ops.breadcrumbs_mask(t, 0.5, 0.2).tolist() == [False, True, True, False, True, True]


def test_task_vectors_and_weighted_sum() -> None:
    base = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    tv = ops.task_vectors(base, [torch.tensor([2.0, 2.0]), torch.tensor([0.0, 4.0])])
    assert tv.dtype == torch.float32 and tv.tolist() == [[1.0, 0.0], [-1.0, 2.0]]
    assert ops.weighted_sum(tv, torch.tensor([2.0, -1.0])).tolist() == [3.0, -2.0]


def test_sign_consensus_and_disjoint_merge() -> None:
    d = torch.tensor([[1.0, -2.0, 0.5, 0.0], [-3.0, 1.0, 0.5, 0.0]])
    # sums: -2, -1, 1, 0 -> elected -, -, +, + (zero vote elects +; zeros never agree)
    mask = ops.sign_consensus_mask(d)
    assert mask.tolist() == [[False, True, True, False], [True, False, True, False]]
    ones = torch.ones(2)
    assert ops.disjoint_merge(d, ones, mask, normalize=True).tolist() == [-3.0, -2.0, 0.5, 0.0]
    w = torch.tensor([2.0, 1.0])
    assert ops.disjoint_merge(d, w, mask, normalize=True).tolist() == [-3.0, -2.0, 0.5, 0.0]
    assert ops.disjoint_merge(d, w, mask, normalize=False).tolist() == [-3.0, -4.0, 1.5, 0.0]
    # count election: entry 0 has one + and one - -> elected +
    assert ops.sign_consensus_mask(d, "count")[:, 0].tolist() == [True, False]


def _mergekit_slerp(t: float, v0: np.ndarray, v1: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """mergekit's numpy slerp, transcribed (reference for the torch port)."""
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    dot = np.sum(u0 * u1)
    if np.abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    th = np.arccos(dot)
    return np.sin(th - th * t) / np.sin(th) * v0 + np.sin(th * t) / np.sin(th) * v1


def test_slerp_hand_cases_and_mergekit_formula() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    h = math.sqrt(0.5)
    assert torch.allclose(ops.slerp(a, b, 0.5), torch.tensor([h, h]))
    assert torch.allclose(ops.slerp(a, b, 0.0), a) and torch.allclose(ops.slerp(a, b, 1.0), b)
    # colinear -> lerp
    assert ops.slerp(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0]), 0.5).tolist() == [1.5, 3.0]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    for t in (0.1, 0.5, 0.8):
        ref = _mergekit_slerp(t, x.numpy().astype(np.float64), y.numpy().astype(np.float64))
        assert np.allclose(ops.slerp(x, y, t).numpy(), ref, atol=1e-6)
    z = torch.zeros(3)
    assert np.allclose(
        ops.slerp(z, torch.ones(3), 0.3).numpy(), _mergekit_slerp(0.3, np.zeros(3), np.ones(3))
    )


@pytest.mark.parametrize("density", [0.01, 0.1, 0.3, 0.5, 0.9, 0.999])
def test_random_mask_keep_rate_is_binomial(density: float) -> None:
    n = 200_000
    kept = int(ops.random_mask(torch.empty(n), density, generator=torch.Generator().manual_seed(11)).sum())
    # 5 sigma of Binomial(n, density); the 2^-32 quantisation of the probability is far below it
    assert abs(kept - n * density) <= 5 * math.sqrt(n * density * (1 - density)) + 1


def test_dare_drop_is_mask_times_rescale_on_both_paths() -> None:
    n = 3 * (1 << 16) + 7  # several chunks, odd length (the last 32-bit word is half used)
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    mask = ops.random_mask(x, 0.3, generator=torch.Generator().manual_seed(5))
    fast = ops.dare_drop_(x.clone(), 0.3, rescale=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(fast, torch.where(mask, x / 0.3, 0.0))  # same draws as random_mask, x/p kept
    # non-contiguous / low-precision tensors take the generic path: same mask
    wide = torch.stack([x, x], dim=1)[:, 0]
    generic = ops.dare_drop_(wide, 0.3, rescale=False, generator=torch.Generator().manual_seed(5))
    assert torch.equal(generic, torch.where(mask, x, 0.0))
    half = ops.dare_drop_(x.bfloat16(), 0.3, rescale=False, generator=torch.Generator().manual_seed(5))
    assert torch.equal(half != 0, mask & (x.bfloat16() != 0))


def test_dare_drop_seeds_per_tensor_and_edges() -> None:
    from merging.apply import tensor_seed

    x = torch.randn(5000, generator=torch.Generator().manual_seed(1))

    def drop(name: str, seed: int = 3, density: float = 0.5) -> torch.Tensor:
        gen = torch.Generator().manual_seed(tensor_seed(seed, name))
        return ops.dare_drop_(x.clone(), density, rescale=True, generator=gen)

    assert torch.equal(drop("a.weight"), drop("a.weight"))  # same seed and name: same output
    assert not torch.equal(drop("a.weight") != 0, drop("b.weight") != 0)  # other name: other mask
    assert not torch.equal(drop("a.weight") != 0, drop("a.weight", seed=4) != 0)
    g = torch.Generator().manual_seed(9)
    a, b = ops.random_mask(x, 0.5, generator=g), ops.random_mask(x, 0.5, generator=g)
    assert not torch.equal(a, b)  # each call consumes the generator: experts get their own masks
    g = torch.Generator().manual_seed(9)
    assert torch.equal(ops.dare_drop_(x.clone(), 1.0, rescale=True, generator=g), x)
    assert not ops.dare_drop_(x.clone(), 0.0, rescale=True, generator=g).any()
    assert torch.equal(ops.random_mask(x, 0.5, generator=g), a)  # density 0/1 drew nothing
