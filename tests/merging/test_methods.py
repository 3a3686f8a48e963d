"""merging/methods.py: each method against hand-computed tiny cases, plus dtype/non-float rules."""

from __future__ import annotations

import pytest
import torch

from merging.errors import IncompatibleExpertsError, InvalidRecipeError, UnknownMergeMethodError
from merging.methods import METHODS, get_method, merge_tensor

BASE = torch.tensor([1.0, 2.0, -1.0, 0.0])
E1 = torch.tensor([2.0, 2.5, -1.0, -1.0])  # tau1 = [ 1.0, 0.5, 0.0, -1.0]
E2 = torch.tensor([0.0, 3.0, 0.0, 0.5])  # tau2 = [-1.0, 1.0, 1.0,  0.5]


def run(
    method: str,
    per: list[dict[str, float]],
    params: dict[str, object] | None = None,
    base: torch.Tensor | None = BASE,
    tensors: tuple[torch.Tensor, ...] = (E1, E2),
    seed: int | None = None,
) -> list[float]:
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return merge_tensor(method, base, list(tensors), per, params or {}, gen).tolist()


def test_registry_and_unknown() -> None:
    assert {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "slerp",
        "evo",
    } <= set(METHODS)
    assert all(m.reference_url for m in METHODS.values())
    with pytest.raises(UnknownMergeMethodError, match="known"):
        get_method("frankenmerge")


def test_linear() -> None:
    # (1*E1 + 3*E2) = [2, 11.5, -1, 0.5]; normalised by 4
    assert run("linear", [{"weight": 1}, {"weight": 3}], base=None) == [0.5, 2.875, -0.25, 0.125]
    assert run("linear", [{"weight": 1}, {"weight": 3}], {"normalize": False}, base=None) == [
        2.0,
        11.5,
        -1.0,
        0.5,
    ]
    assert run("linear", [{"weight": 0}, {"weight": 1}], base=None) == E2.tolist()  # one-hot -> that expert
    assert run("linear", [{}, {}], base=None) == [1.0, 2.75, -0.5, -0.25]  # default weights 1 -> mean
    # weights summing to 0 with normalize: no division (mergekit), instead of inf
    assert run("linear", [{"weight": 1}, {"weight": -1}], base=None) == [2.0, -0.5, -1.0, -1.5]


def test_task_arithmetic() -> None:
    # base + 0.5 tau1 - tau2
    assert run("task_arithmetic", [{"weight": 0.5}, {"weight": -1}]) == [2.5, 1.25, -2.0, -1.0]
    assert run("task_arithmetic", [{"weight": 0.5}, {"weight": -1}], {"lambda": 2}) == [4.0, 0.5, -3.0, -2.0]


def test_ties_trim_elect_disjoint_mean() -> None:
    # density 0.5 (k=2): tau1 -> [1,0,0,-1]; tau2 |.|=[1,1,1,.5] -> ties at 1 kept -> [-1,1,1,0]
    # (mergekit keeps exactly 2 there, breaking the tie arbitrarily)
    # sum [0,1,1,-1] -> signs + + + -; agreeing means [1,1,1,-1]
    assert run("ties", [{"density": 0.5}, {"density": 0.5}]) == [2.0, 3.0, 0.0, -1.0]
    # density 1: sum [0,1.5,1,-.5] -> + + + -; means [1, 0.75, 1, -1]
    assert run("ties", [{}, {}]) == [2.0, 2.75, 0.0, -1.0]
    # weights [1,3]: weighted [1,.5,0,-1], [-3,3,3,1.5]; sum [-2,3.5,3,.5] -> - + + +
    # mixed [-3, 3.5, 3, 1.5] / agreeing weight sums [3, 4, 3, 3]
    assert run("ties", [{"weight": 1}, {"weight": 3}]) == [0.0, 2.875, 0.0, 0.5]
    assert run("ties", [{"weight": 1}, {"weight": 3}], {"normalize": False}) == [-2.0, 5.5, 2.0, 1.5]
    assert run("ties", [{"weight": 1}, {"weight": 3}], {"lambda": 0.5}) == [0.5, 2.4375, -0.5, 0.25]
    assert run("ties", [{"density": 0.0}, {"density": 0.0}]) == BASE.tolist()


def test_ties_identical_experts_give_that_expert() -> None:
    g = torch.Generator().manual_seed(0)
    base, e = torch.randn(50, generator=g), torch.randn(50, generator=g)
    out = merge_tensor("ties", base, [e, e, e], [{"density": 1.0}] * 3)
    assert torch.allclose(out, e, atol=1e-6)


def test_dare_linear_drop_and_rescale() -> None:
    per = [{"weight": 0.5, "density": 1.0}, {"weight": -1.0, "density": 1.0}]
    assert run("dare_linear", per, seed=0) == [2.5, 1.25, -2.0, -1.0]  # density 1 == task arithmetic
    assert run("dare_linear", [{"density": 0.0}, {"density": 0.0}], seed=0) == BASE.tolist()
    # single expert, density 0.25: every entry is either dropped or rescaled by 4
    g = torch.Generator().manual_seed(0)
    base, e = torch.randn(2000, generator=g), torch.randn(2000, generator=g)
    tau = e - base
    out = merge_tensor("dare_linear", base, [e], [{"density": 0.25}], {}, torch.Generator().manual_seed(3))
    delta = out - base
    kept = delta != 0
    assert torch.allclose(delta[kept], 4 * tau[kept], atol=1e-5)
    assert abs(kept.float().mean().item() - 0.25) < 0.04
    no_rescale = merge_tensor(
        "dare_linear", base, [e], [{"density": 0.25}], {"rescale": False}, torch.Generator().manual_seed(3)
    )
    assert torch.allclose((no_rescale - base)[kept], tau[kept], atol=1e-6)


def test_dare_is_reproducible_with_a_seed() -> None:
    g = torch.Generator().manual_seed(0)
    base, e1, e2 = (torch.randn(300, generator=g) for _ in range(3))
    per = [{"density": 0.4}, {"density": 0.6, "weight": 0.5}]
    for name in ("dare_linear", "dare_ties"):
        a = merge_tensor(name, base, [e1, e2], per, {}, torch.Generator().manual_seed(7))
        b = merge_tensor(name, base, [e1, e2], per, {}, torch.Generator().manual_seed(7))
        c = merge_tensor(name, base, [e1, e2], per, {}, torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_dare_ties_density_one_is_ties() -> None:
    per = [{"weight": 1.0, "density": 1.0}, {"weight": 3.0, "density": 1.0}]
    assert run("dare_ties", per, {"normalize": True}, seed=0) == run("ties", per)
    assert run("dare_ties", per, seed=0) == [-2.0, 5.5, 2.0, 1.5]  # mergekit default: normalize off


def test_breadcrumbs() -> None:
    base, e = torch.zeros(10), torch.arange(1.0, 11.0)
    per = [{"density": 0.5, "gamma": 0.1}]
    assert merge_tensor("breadcrumbs", base, [e], per).tolist() == [0, 0, 0, 0, 5, 6, 7, 8, 9, 0]
    per2 = [{"density": 0.5, "gamma": 0.1, "weight": 2.0}]
    assert merge_tensor("breadcrumbs", base, [e], per2, {"lambda": 0.5}).tolist() == [
        0,
        0,
        0,
        0,
        5,
        6,
        7,
        8,
        9,
        0,
    ]
    assert merge_tensor("breadcrumbs", base, [e], [{"density": 1.0}]).tolist() == e.tolist()
    # with TIES: the second expert's entries have the minority sign and are dropped
    e2 = -0.5 * e
    both = [{"density": 0.5, "gamma": 0.1}] * 2
    assert merge_tensor("breadcrumbs_ties", base, [e, e2], both).tolist() == [0, 0, 0, 0, 5, 6, 7, 8, 9, 0]
    assert merge_tensor("breadcrumbs", base, [e, e2], both).tolist() == [0, 0, 0, 0, 2.5, 3, 3.5, 4, 4.5, 0]


def test_slerp() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    h = 2**-0.5
    assert torch.allclose(merge_tensor("slerp", a, [b], [{}], {"t": 0.5}), torch.tensor([h, h]))
    assert torch.allclose(merge_tensor("slerp", None, [a, b], [{}, {}], {"t": 0.0}), a)


def test_evo_full_form() -> None:
    # S_0.5(tau1): keep 2 -> [1,0,0,-1]; S_0.25(tau2): keep round(1)=1, thr 1 tied 3x -> [-1,1,1,0]
    # base + 1*[1,0,0,-1] - 0.5*[-1,1,1,0]
    per = [{"alpha": 0.5, "beta": 1.0}, {"alpha": 0.25, "beta": -0.5}]
    assert run("evo", per) == [2.5, 1.5, -1.5, -1.0]
    assert run("evo", [{"alpha": 0.0, "beta": 1}, {"alpha": 1.0, "beta": 1}]) == E2.tolist()
    assert run("evo", [{"alpha": 1.0, "beta": 1}, {"alpha": 1.0, "beta": 1}]) == [1.0, 3.5, 0.0, -0.5]
    assert run("evo", [{"alpha": 1.0, "beta": -1.5}, {"alpha": 1.0, "beta": 0.0}]) == [-0.5, 1.25, -1.0, 1.5]
    # tiny alpha keeps at least one entry (ties: both |1| entries of tau1)
    assert run("evo", [{"alpha": 0.01, "beta": 1}, {"alpha": 0.0, "beta": 1}]) == [2.0, 2.0, -1.0, -1.0]


@pytest.mark.parametrize(
    "name", ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "evo"]
)
def test_all_zero_task_vectors_give_base(name: str) -> None:
    per = [{"density": 0.5}] if name != "evo" else [{"alpha": 0.3, "beta": -1.2}]
    params = {}
    out = merge_tensor(name, BASE, [BASE.clone()], per, params, torch.Generator().manual_seed(0))
    assert out.tolist() == BASE.tolist()


CASES = {
    "linear": (False, [{"weight": 0.3}, {"weight": 0.7}], {}),
    "task_arithmetic": (True, [{"weight": 0.3}, {"weight": 0.7}], {}),
    "ties": (True, [{"density": 0.5}, {"density": 0.7}], {}),
    "dare_linear": (True, [{"density": 0.5}, {"density": 0.7}], {}),
    "dare_ties": (True, [{"density": 0.5}, {"density": 0.7}], {}),
    "breadcrumbs": (True, [{"density": 0.5}, {"density": 0.7}], {}),
    "breadcrumbs_ties": (True, [{"density": 0.5}, {"density": 0.7}], {}),
    "slerp": (True, [{}], {"t": 0.3}),
    "evo": (True, [{"alpha": 0.5, "beta": 0.5}, {"alpha": 0.7, "beta": -0.5}], {}),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_preserved_and_float32_compute(name: str, dtype: torch.dtype) -> None:
    with_base, per, params = CASES[name]
    g = torch.Generator().manual_seed(0)
    base, *ts = (torch.randn(8, 8, generator=g).to(dtype) for _ in range(1 + len(per)))
    out = merge_tensor(name, base if with_base else None, ts, per, params, torch.Generator().manual_seed(1))
    assert out.dtype == dtype and out.device == base.device and out.shape == base.shape
    ref = merge_tensor(
        name,
        base.float() if with_base else None,
        [t.float() for t in ts],
        per,
        params,
        torch.Generator().manual_seed(1),
    )
    assert torch.equal(out, ref.to(dtype))  # computed in float32, rounded once


@pytest.mark.parametrize("name", sorted(CASES))
def test_non_float_tensors_are_copied(name: str) -> None:
    with_base, per, params = CASES[name]
    ints = [torch.arange(6) * (i + 1) for i in range(1 + len(per))]
    base, ts = (ints[0], ints[1:]) if with_base else (None, ints[1:])
    out = merge_tensor(name, base, ts, per, params, torch.Generator().manual_seed(0))
    assert out.dtype == torch.int64 and torch.equal(out, ints[0] if with_base else ints[1])


def test_argument_errors() -> None:
    with pytest.raises(InvalidRecipeError, match="base"):
        merge_tensor("ties", None, [E1], [{}])
    with pytest.raises(IncompatibleExpertsError, match="shapes"):
        merge_tensor("linear", None, [E1, torch.zeros(3)], [{}, {}])
    with pytest.raises(InvalidRecipeError, match="density"):
        merge_tensor("ties", BASE, [E1], [{"density": 1.5}])
    with pytest.raises(InvalidRecipeError, match="LoRA"):
        merge_tensor("cat", None, [E1], [{}])


@pytest.mark.parametrize("normalize", [False, True])
def test_chunked_disjoint_merge_equals_ops_reference(normalize: bool) -> None:
    from merging import ops
    from merging.methods import _disjoint_in_place

    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(3, 70_001, generator=g)  # several column chunks, ragged last chunk
    deltas[:, ::5] = 0.0  # zeros never agree
    deltas[1, 1::7] = -deltas[0, 1::7]  # exact cancellations: a zero vote elects +
    ws = [0.5, -1.0, 2.0]  # a negative weight flips that expert's agreeing sign
    w = torch.tensor(ws)
    mask = ops.sign_consensus_mask(deltas * w[:, None])  # elect by weighted mass, as mergekit
    ref = ops.disjoint_merge(deltas, w, mask, normalize=normalize)
    got = _disjoint_in_place(deltas.clone(), ws, w, normalize=normalize)
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-6, rtol=1e-6)
