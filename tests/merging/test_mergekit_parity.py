"""Parity with mergekit (the offline-merging peer) on tiny GPT-2 models built in the test.

mergekit is a test/bench dependency only. Both tools read the same safetensors files; every
float tensor must agree within 1e-5 (float32).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merging.apply import merge_tensors
from merging.recipe import MergeRecipe
from merging.sources import SafetensorsSource

mergekit_merge = pytest.importorskip("mergekit.merge", reason="mergekit is not installed (pip install '.[dev]')")
from mergekit.config import MergeConfiguration  # noqa: E402

pytestmark = pytest.mark.peers


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    from transformers import GPT2Config, GPT2LMHeadModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("mk")
    cfg = GPT2Config(n_layer=2, n_embd=48, n_head=2, vocab_size=96, n_positions=32, bos_token_id=0, eos_token_id=0)
    out = []
    torch.manual_seed(0)
    base = GPT2LMHeadModel(cfg)
    for i in range(4):
        m = GPT2LMHeadModel(cfg)
        m.load_state_dict(base.state_dict())
        if i:  # experts = base + a task-like perturbation, so task vectors are meaningful
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        d = root / f"m{i}"
        m.save_pretrained(d)
        out.append(d)
    return out


def run_mergekit(cfg: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(cfg), str(out),
              options=MergeOptions(lazy_unpickle=False, copy_tokenizer=False, quiet=True))
    return load_file(out / "model.safetensors")


def run_ours(recipe: dict, paths: dict[str, Path]) -> dict[str, torch.Tensor]:
    r = MergeRecipe.model_validate(recipe)
    return dict(merge_tensors(r, {k: SafetensorsSource(p) for k, p in paths.items()}))


CASES = {
    "linear": (
        {"merge_method": "linear", "parameters": {"normalize": True}},
        {"method": "linear", "parameters": {"normalize": True}}, [0.2, 0.5, 0.3], {}),
    "task_arithmetic": (
        {"merge_method": "task_arithmetic", "parameters": {"normalize": False, "lambda": 0.8}},
        {"method": "task_arithmetic", "parameters": {"normalize": False, "lambda": 0.8}}, [0.5, -0.3, 1.0], {}),
    "ties": (
        {"merge_method": "ties", "parameters": {"normalize": True, "lambda": 1.0}},
        {"method": "ties", "parameters": {"normalize": True, "lambda": 1.0}}, [0.4, 0.4, 0.2], {"density": 0.4}),
    "breadcrumbs": (
        {"merge_method": "breadcrumbs", "parameters": {"normalize": False}},
        {"method": "breadcrumbs", "parameters": {"normalize": False}}, [0.5, 0.3, 0.2],
        {"density": 0.7, "gamma": 0.05}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_agrees_with_mergekit(case, models, tmp_path):
    mk_cfg, ours_cfg, weights, extra = CASES[case]
    base, experts = models[0], models[1:]
    uses_base = case != "linear"
    mk_models = [{"model": str(p), "parameters": {"weight": w, **extra}} for p, w in zip(experts, weights)]
    mk = {**mk_cfg, "models": mk_models, "dtype": "float32"}
    if uses_base:
        mk["base_model"] = str(base)
    theirs = run_mergekit(mk, tmp_path / "out")
    paths = {f"e{i}": p for i, p in enumerate(experts)}
    recipe = {**ours_cfg, "experts": [{"id": f"e{i}", "weight": w, **extra} for i, w in enumerate(weights)],
              "dtype": "float32"}
    if uses_base:
        paths["base"] = base
        recipe["base"] = "base"
    ours = run_ours(recipe, paths)
    common = sorted(set(ours) & set(theirs))
    assert len(common) >= len(theirs) - 1  # mergekit may drop/add the tied lm_head copy
    for k in common:
        if ours[k].is_floating_point():
            torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=0, msg=f"{case}: {k}")
