"""merging/lora.py: the Evo LoRA operator by hand, and LoRA linear/cat against peft itself."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from merging.apply import merge_tensors
from merging.errors import IncompatibleExpertsError
from merging.lora import cat_lora, evo_lora, linear_lora, lora_modules, lora_scaling, merged_lora_config
from merging.recipe import MergeRecipe
from merging.sources import DictSource, SafetensorsSource

from .conftest import tiny_gpt2

A1 = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
A2 = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
B1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
B2 = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, -3.0]])


def test_evo_lora_hand_case() -> None:
    # S_0.5(A1): keep 2 of |.|=[1,2,.5,0] -> [[1,-2],[0,0]]; S_0.25(A2): keep 1 -> [[0,0],[2,0]]
    a, b = evo_lora([A1, A2], [B1, B2], alpha=[0.5, 0.25], beta=[1.0, -1.0])
    assert a.tolist() == [[1.0, -2.0], [-2.0, 0.0]]
    assert b.tolist() == (B1 - B2).tolist()  # B is never sparsified by default
    # sparsify_b: S_0.5(B1) keeps 3 of 6 (all |1| tie -> 4 kept); S_0.25(B2): round(1.5)=2 -> 3 and 2
    _, b2 = evo_lora([A1, A2], [B1, B2], alpha=[0.5, 0.25], beta=[1.0, -1.0], sparsify_b=True)
    assert b2.tolist() == [[1.0, -2.0], [0.0, 1.0], [1.0, 4.0]]
    # alpha 0 drops the A contribution, negative beta flips both factors
    a3, b3 = evo_lora([A1, A2], [B1, B2], alpha=[0.0, 1.0], beta=[-1.5, 0.5])
    assert a3.tolist() == (0.5 * A2).tolist() and b3.tolist() == (-1.5 * B1 + 0.5 * B2).tolist()


def test_evo_lora_dtype_and_rank_check() -> None:
    a, b = evo_lora([A1.half(), A2.half()], [B1.half(), B2.half()], [0.5, 0.5], [0.5, 0.5])
    assert a.dtype == b.dtype == torch.float16
    with pytest.raises(IncompatibleExpertsError, match="rank"):
        evo_lora([A1, torch.zeros(3, 2)], [B1, torch.zeros(3, 3)], [1, 1], [1, 1])


def test_cat_is_exact_sum_of_updates() -> None:
    w, s = [0.7, -0.4], [2.0, 1.0]
    a, b = cat_lora([A1, A2], [B1, B2], w, s)
    assert a.shape == (4, 2) and b.shape == (3, 4)
    assert torch.allclose(b @ a, 0.7 * 2.0 * B1 @ A1 - 0.4 * 1.0 * B2 @ A2)


def test_lora_modules_pairs_keys() -> None:
    keys = [
        "m.x.lora_A.weight",
        "m.x.lora_B.weight",
        "m.y.lora_A.default.weight",
        "m.y.lora_B.default.weight",
        "emb.lora_embedding_A",
        "emb.lora_embedding_B",
        "lonely.lora_A.weight",
        "other.weight",
    ]
    assert lora_modules(keys) == {
        "m.x.lora_*.weight": ("m.x.lora_A.weight", "m.x.lora_B.weight"),
        "m.y.lora_*.default.weight": ("m.y.lora_A.default.weight", "m.y.lora_B.default.weight"),
        "emb.lora_embedding_*": ("emb.lora_embedding_A", "emb.lora_embedding_B"),
    }
    assert lora_scaling({"r": 4, "lora_alpha": 8}) == 2.0
    assert lora_scaling({"r": 4, "lora_alpha": 8, "use_rslora": True}) == 4.0
    assert merged_lora_config("cat", {"r": 4, "lora_alpha": 8}, [4, 4])["lora_alpha"] == 8
    assert merged_lora_config("linear", {"r": 4, "lora_alpha": 8}, [4, 4])["lora_alpha"] == 4


@pytest.fixture(scope="module")
def peft_model():  # type: ignore[no-untyped-def]
    """Tiny GPT-2 with two random (non-zero B) adapters of different scalings, merged by peft."""
    warnings.filterwarnings("ignore", category=UserWarning)
    targets = ["c_attn", "c_proj"]
    model = tiny_gpt2(0)
    torch.manual_seed(1)
    cfg_a = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, fan_in_fan_out=True
    )
    cfg_b = LoraConfig(
        r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False, fan_in_fan_out=True
    )
    pm = get_peft_model(model, cfg_a, adapter_name="a")
    pm.add_adapter("b", cfg_b)
    weights = [0.7, -0.4]
    pm.add_weighted_adapter(["a", "b"], weights, "lin", combination_type="linear")
    pm.add_weighted_adapter(["a", "b"], weights, "cat", combination_type="cat")
    sd = {n: get_peft_model_state_dict(pm, adapter_name=n) for n in ("a", "b", "lin", "cat")}
    return pm, sd, weights


@pytest.mark.parametrize("kind", ["lin", "cat"])
def test_linear_and_cat_equal_peft(peft_model, kind: str) -> None:  # type: ignore[no-untyped-def]
    pm, sd, weights = peft_model
    scalings = [2.0, 1.0]  # lora_alpha / r of "a" and "b"
    fn = linear_lora if kind == "lin" else cat_lora
    mods = lora_modules(sd["a"].keys())
    assert len(mods) == 6
    for a_key, b_key in mods.values():
        a, b = fn([sd["a"][a_key], sd["b"][a_key]], [sd["a"][b_key], sd["b"][b_key]], weights, scalings)
        assert torch.allclose(a, sd[kind][a_key], atol=1e-6, rtol=0)
        assert torch.allclose(b, sd[kind][b_key], atol=1e-6, rtol=0)
    assert pm.peft_config[kind].lora_alpha == pm.peft_config[kind].r  # merged scaling is 1


def test_merge_tensors_lora_linear_equals_peft(peft_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pm, sd, weights = peft_model
    for name in ("a", "b"):
        pm.save_pretrained(tmp_path, selected_adapters=[name])
    dirs = {
        n: next(
            p.parent
            for p in tmp_path.rglob("adapter_model.safetensors")
            if (p.parent.name == n) or (n == "a" and p.parent == tmp_path)
        )
        for n in ("a", "b")
    }
    sources = {n: SafetensorsSource(d) for n, d in dirs.items()}
    assert sources["a"].lora_scaling == 2.0 and sources["b"].lora_scaling == 1.0
    recipe = MergeRecipe(
        method="linear",
        base="gpt2-tiny",
        experts=[{"id": "a", "weight": weights[0]}, {"id": "b", "weight": weights[1]}],
        parameters={"normalize": False},
    )
    out = dict(merge_tensors(recipe, sources))
    assert set(out) == set(sd["lin"])
    for k, v in out.items():
        assert torch.allclose(v, sd["lin"][k], atol=1e-6, rtol=0), k
    # in-memory sources need explicit scalings
    mem = {"a": DictSource(sd["a"]), "b": DictSource(sd["b"])}
    with pytest.raises(IncompatibleExpertsError, match="scaling"):
        dict(merge_tensors(recipe, mem))
    out2 = dict(merge_tensors(recipe, mem, lora_scalings={"a": 2.0, "b": 1.0}))
    assert all(torch.equal(out2[k], out[k]) for k in out)


def test_merge_tensors_lora_evo_skips_missing_modules(peft_model) -> None:  # type: ignore[no-untyped-def]
    _, sd, _ = peft_model
    a, b = dict(sd["a"]), dict(sd["b"])
    mods = list(lora_modules(a.keys()).values())
    dropped_a, dropped_b = mods[0]
    del b[dropped_a], b[dropped_b]  # adapter b lacks the first module
    recipe = MergeRecipe(
        method="evo",
        base="gpt2-tiny",
        experts=[{"id": "a", "alpha": 0.4, "beta": 0.8}, {"id": "b", "alpha": 0.6, "beta": -0.5}],
    )
    out = dict(merge_tensors(recipe, {"a": DictSource(a), "b": DictSource(b)}))
    exp_a, exp_b = evo_lora([a[dropped_a]], [a[dropped_b]], [0.4], [0.8])
    assert torch.equal(out[dropped_a], exp_a) and torch.equal(out[dropped_b], exp_b)
    a_key, b_key = mods[1]
    exp_a, exp_b = evo_lora([a[a_key], b[a_key]], [a[b_key], b[b_key]], [0.4, 0.6], [0.8, -0.5])
    assert torch.equal(out[a_key], exp_a) and torch.equal(out[b_key], exp_b)


def test_estimate_lora(peft_model) -> None:  # type: ignore[no-untyped-def]
    from merging.apply import estimate

    _, sd, _ = peft_model
    srcs = {"a": DictSource(sd["a"]), "b": DictSource(sd["b"])}
    one = sum(v.numel() * 4 for v in sd["a"].values())
    evo = MergeRecipe(method="evo", base="gpt2-tiny", experts=[{"id": "a"}, {"id": "b"}])
    cat = MergeRecipe(method="cat", experts=[{"id": "a"}, {"id": "b"}])
    assert estimate(evo, srcs)["num_tensors"] == 12 and estimate(evo, srcs)["output_bytes"] == one
    assert estimate(cat, srcs)["output_bytes"] == 2 * one  # the ranks are concatenated
    ties = MergeRecipe(method="ties", base="gpt2-tiny", experts=[{"id": "a"}, {"id": "b"}])
    with pytest.raises(IncompatibleExpertsError, match="no LoRA form"):
        estimate(ties, srcs)
