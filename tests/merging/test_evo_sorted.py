"""merging/evo_sorted.py: the packed (sorted-layout) block of EvoPlan equals the reference S_k.

The packed block groups tensors by size and uses one GEMV plus one scatter per expert and size;
these tests aim at what that grouping could get wrong: ties at the cut, mixed sizes, the
"drop" (alpha >= 1/2) and "keep" (alpha < 1/2) forms, and the cached same-alpha path.
"""

from __future__ import annotations

import random

import pytest
import torch

from merging.evo import EvoPlan
from merging.lora import evo_lora, lora_modules
from merging.methods import merge_tensor

A_KEY = "base_model.model.{}.lora_A.weight"
B_KEY = "base_model.model.{}.lora_B.weight"


def test_ties_at_the_cut_are_kept_in_both_forms() -> None:
    # |x| sorted: 0.25, 0.5, 1, 1, 1, 2; two modules of the same size share one size group
    x = torch.tensor([[0.5, -1.0, 1.0, 2.0, 1.0, 0.25]])
    y = torch.tensor([[1.0, 0.25, -2.0, -1.0, 0.5, 1.0]])
    adapter = {A_KEY.format("q"): x, B_KEY.format("q"): torch.ones(2, 1)}
    adapter |= {A_KEY.format("v"): y, B_KEY.format("v"): torch.ones(2, 1)}
    plan = EvoPlan.lora([adapter])
    assert plan.blocks[0].packed is not None and plan.blocks[0].packed.groups == [(6, 2, 0)]
    out = {k: torch.empty_like(v) for k, v in adapter.items()}
    for alpha, keep_x, keep_y in [
        (0.1, [0, 0, 0, 2, 0, 0], [0, 0, -2, 0, 0, 0]),  # n_keep 1: the largest only
        (0.3, [0, -1, 1, 2, 1, 0], [1, 0, -2, -1, 0, 1]),  # n_keep 2 (keep form): cut inside the 1s
        (0.5, [0, -1, 1, 2, 1, 0], [1, 0, -2, -1, 0, 1]),  # n_keep 3 (drop form): same tie run
        (0.7, [0, -1, 1, 2, 1, 0], [1, 0, -2, -1, 0, 1]),  # n_keep 4
        (0.9, [0.5, -1, 1, 2, 1, 0], [1, 0, -2, -1, 0.5, 1]),  # n_keep 5
    ]:
        for beta in (1.0, -2.0):
            plan.apply([alpha], [beta], out)
            assert out[A_KEY.format("q")].flatten().tolist() == [beta * v for v in keep_x], (alpha, beta)
            assert out[A_KEY.format("v")].flatten().tolist() == [beta * v for v in keep_y], (alpha, beta)


def _tied_adapters(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Mixed A sizes (some shared, some not), values on a coarse grid so |x| ties are common."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (4, 16), "k": (4, 16), "v": (2, 24), "o": (8, 8), "up": (4, 40), "down": (1, 3)}
    out = []
    for _ in range(n):
        sd = {}
        for m, (r, d) in shapes.items():
            sd[A_KEY.format(m)] = (torch.randn(r, d, generator=g) * 4).round() / 4
            sd[B_KEY.format(m)] = torch.randn(d, r, generator=g)
        out.append(sd)
    return out


@pytest.mark.parametrize(("cache_masked", "sparsify_b"), [(True, False), (False, False), (True, True)])
def test_packed_block_equals_evo_lora_with_ties_and_mixed_sizes(cache_masked: bool, sparsify_b: bool) -> None:
    adapters = _tied_adapters(4, seed=3)
    plan = EvoPlan.lora(adapters, cache_masked=cache_masked, sparsify_b=sparsify_b)
    assert plan.blocks[0].packed is not None and len(plan.blocks[0].packed.groups) >= 4
    targets = {k: torch.empty_like(v) for k, v in adapters[0].items()}
    rng = random.Random(0)
    for _ in range(12):
        alpha = [rng.choice([0.0, 1e-3, 0.2, 0.49, 0.5, 0.51, 0.8, 1.0, rng.random()]) for _ in range(4)]
        betas = [rng.uniform(-1.5, 1.5) for _ in range(4)], [rng.choice([0.0, -1.0, 0.7]) for _ in range(4)]
        for beta in betas:
            plan.apply(alpha, beta, targets)  # the second call with this alpha takes the cached path
            for a_key, b_key in lora_modules(adapters[0].keys()).values():
                a_in, b_in = [x[a_key] for x in adapters], [x[b_key] for x in adapters]
                ref_a, ref_b = evo_lora(a_in, b_in, alpha, beta, sparsify_b=sparsify_b)
                assert torch.allclose(targets[a_key], ref_a, rtol=1e-6, atol=1e-6), (alpha, beta, a_key)
                assert torch.allclose(targets[b_key], ref_b, rtol=1e-6, atol=1e-6), (alpha, beta, b_key)


def test_full_form_packed_and_streamed_blocks_together() -> None:
    g = torch.Generator().manual_seed(1)
    base = {"big": torch.randn(30, 20, generator=g), "b1": torch.randn(20, generator=g)}
    base["b2"] = torch.zeros(20)
    noise = [{k: (torch.randn(v.shape, generator=g) * 8).round() / 8 for k, v in base.items()} for _ in "abc"]
    experts = [{k: base[k] + d[k] for k in base} for d in noise]  # coarse grid: ties at the cut
    plan = EvoPlan.full(base, experts, packed_max=100)  # b1, b2 packed (one size group); big streamed
    assert [b.packed is not None for b in plan.blocks] == [True, False]
    views = plan.allocate_targets()  # the plan's own buffers: nothing to copy back
    for alpha in ([0.3, 0.6, 1.0], [0.0, 0.5, 0.05], [0.9, 0.9, 0.9]):
        beta = [0.5, -1.25, 1.0]
        plan.apply(alpha, beta, views)
        per = [{"alpha": a, "beta": b} for a, b in zip(alpha, beta, strict=True)]
        for k in base:
            ref = merge_tensor("evo", base[k], [e[k] for e in experts], per)
            assert torch.allclose(views[k], ref, rtol=1e-6, atol=1e-6), (alpha, k)
