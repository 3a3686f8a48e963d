"""merging/evo.py: the fast in-memory path equals the reference (methods.evo / lora.evo_lora)."""

from __future__ import annotations

import random

import pytest
import torch

from merging.evo import EvoPlan
from merging.lora import evo_lora, lora_modules
from merging.methods import merge_tensor

from .conftest import finetuned_like, tiny_gpt2

TOL = 1e-6


def candidates(n: int, count: int, seed: int = 0) -> list[tuple[list[float], list[float]]]:
    rng = random.Random(seed)
    out = [([1.0] * n, [1.0 / n] * n), ([0.0] * n, [1.0] * n)]
    for _ in range(count):
        alpha = [rng.choice([0.0, 1.0, rng.random(), 0.001]) for _ in range(n)]
        out.append((alpha, [rng.uniform(-1.5, 1.5) for _ in range(n)]))
        out.append((alpha, [rng.uniform(-1.5, 1.5) for _ in range(n)]))  # same alpha: cached masks
    return out


def test_hand_case_thresholds_by_lookup() -> None:
    base = {"x": torch.zeros(6)}
    plan = EvoPlan.full(base, [{"x": torch.tensor([0.5, -3.0, 2.0, -2.0, 1.0, 0.0])}])
    out = {"x": torch.empty(6)}
    for alpha, expected in [
        (0.25, [0, -3, 2, -2, 0, 0]),
        (0.6, [0, -3, 2, -2, 1, 0]),
        (0.01, [0, -3, 0, 0, 0, 0]),
        (0.0, [0] * 6),
        (1.0, [0.5, -3, 2, -2, 1, 0]),
    ]:
        plan.apply([alpha], [1.0], out)
        assert out["x"].tolist() == expected, alpha
        plan.apply([alpha], [-0.5], out)  # same alpha again: cached masked stack + GEMV
        assert out["x"].tolist() == [-0.5 * v for v in expected], alpha


@pytest.mark.parametrize(("cache_masked", "chunk_size"), [(True, 1 << 17), (False, 1 << 17), (True, 77)])
def test_full_form_equals_slow_path_in_place(cache_masked: bool, chunk_size: int) -> None:
    base = tiny_gpt2(0)
    experts = [finetuned_like(base, seed=s).state_dict() for s in (1, 2, 3)]
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    base_sd["steps"] = torch.tensor([3])  # a non-float buffer passes through
    for e in experts:
        e["steps"] = torch.tensor([9])
    plan = EvoPlan.full(base_sd, experts, cache_masked=cache_masked, chunk_size=chunk_size)
    target = tiny_gpt2(0)  # a resident model whose parameters receive each candidate
    params = dict(target.named_parameters())
    targets = {**params, "steps": torch.zeros(1, dtype=torch.int64)}
    ptrs = {k: v.data_ptr() for k, v in targets.items()}
    for alpha, beta in candidates(3, 4):
        plan.apply(alpha, beta, targets)
        per = [{"alpha": a, "beta": b} for a, b in zip(alpha, beta, strict=True)]
        for name, t in targets.items():
            ref = merge_tensor("evo", base_sd[name], [e[name] for e in experts], per)
            assert (t.detach() - ref).abs().max().item() <= TOL, name
    assert {k: v.data_ptr() for k, v in targets.items()} == ptrs  # written in place, no reallocation
    assert params["transformer.wte.weight"].requires_grad  # parameters stay parameters


def test_full_form_low_precision_targets_and_zero_copy() -> None:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(40, 30, generator=g).bfloat16(), "b": torch.randn(30, generator=g).bfloat16()}
    experts = [
        {k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
        for _ in range(4)
    ]
    plan = EvoPlan.full(base, experts)
    bf16 = {k: torch.empty_like(v) for k, v in base.items()}
    views = plan.allocate_targets()
    alpha, beta = [0.2, 0.5, 1.0, 0.0], [0.7, -0.3, 0.25, 1.0]
    plan.apply(alpha, beta, bf16)
    plan.apply(alpha, beta, views)
    per = [{"alpha": a, "beta": b} for a, b in zip(alpha, beta, strict=True)]
    for k in base:
        ref = merge_tensor("evo", base[k], [e[k] for e in experts], per)  # bf16 out
        assert bf16[k].dtype == torch.bfloat16
        # same float32 value up to summation order, rounded once to bf16 (at most 1 ulp apart)
        assert torch.allclose(bf16[k].float(), ref.float(), rtol=2**-7, atol=1e-6), k
        ref32 = merge_tensor("evo", base[k].float(), [e[k].float() for e in experts], per)
        assert (views[k] - ref32).abs().max().item() <= TOL, k


def _adapters(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"l0.q": (24, 16), "l0.v": (24, 16), "l0.down": (16, 40)}  # (d_out, d_in)
    out = []
    for _ in range(n):
        sd = {}
        for m, (d_out, d_in) in shapes.items():
            sd[f"base_model.model.{m}.lora_A.weight"] = torch.randn(4, d_in, generator=g)
            sd[f"base_model.model.{m}.lora_B.weight"] = torch.randn(d_out, 4, generator=g)
        out.append(sd)
    return out


@pytest.mark.parametrize(("sparsify_b", "chunk_size"), [(False, 1 << 17), (True, 1 << 17), (False, 10)])
def test_lora_form_equals_evo_lora(sparsify_b: bool, chunk_size: int) -> None:
    adapters = _adapters(5)
    missing = "base_model.model.l0.v.lora_A.weight", "base_model.model.l0.v.lora_B.weight"
    for k in missing:  # the last adapter lacks one module: it contributes nothing there
        del adapters[4][k]
    plan = EvoPlan.lora(adapters, sparsify_b=sparsify_b, chunk_size=chunk_size)
    targets = {k: torch.empty_like(v) for k, v in adapters[0].items()}
    assert sorted(plan.names) == sorted(targets)
    for alpha, beta in candidates(5, 4, seed=1):
        plan.apply(alpha, beta, targets)
        for a_key, b_key in lora_modules(adapters[0].keys()).values():
            idx = [i for i, ad in enumerate(adapters) if a_key in ad]
            ref_a, ref_b = evo_lora(
                [adapters[i][a_key] for i in idx],
                [adapters[i][b_key] for i in idx],
                [alpha[i] for i in idx],
                [beta[i] for i in idx],
                sparsify_b=sparsify_b,
            )
            assert (targets[a_key] - ref_a).abs().max().item() <= TOL
            assert (targets[b_key] - ref_b).abs().max().item() <= TOL


def test_apply_checks() -> None:
    plan = EvoPlan.lora(_adapters(2))
    with pytest.raises(ValueError, match="alpha"):
        plan.apply([1.0], [1.0], {})
    plan.apply([1.0, 1.0], [1.0, 1.0], {})  # no targets: computed, nothing copied
    assert plan.nbytes > 0


def test_plan_argument_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        EvoPlan.full({"x": torch.zeros(2)}, [])
    with pytest.raises(ValueError, match="shape"):
        EvoPlan.full({"x": torch.zeros(2)}, [{"x": torch.zeros(3)}])
    with pytest.raises(ValueError, match="no LoRA"):
        EvoPlan.lora([{"w": torch.zeros(2)}])
    plan = EvoPlan.full({"x": torch.zeros(2)}, [{"x": torch.ones(2)}])
    with pytest.raises(ValueError, match="shape"):
        plan.apply([1.0], [1.0], {"x": torch.zeros(3)})
