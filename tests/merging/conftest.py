"""Fixtures for the merge-library tests: tiny GPT-2 checkpoints written locally (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel


def tiny_gpt2_config(**overrides: int) -> GPT2Config:
    kw = {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 64, "n_positions": 32}
    kw.update(bos_token_id=0, eos_token_id=0)
    kw.update(overrides)
    return GPT2Config(**kw)


def tiny_gpt2(seed: int, **overrides: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_gpt2_config(**overrides)).eval()


def finetuned_like(base: GPT2LMHeadModel, seed: int, scale: float = 0.05) -> GPT2LMHeadModel:
    """A copy of ``base`` with seeded noise added to every parameter (a fake fine-tune)."""
    model = tiny_gpt2(0)
    model.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="session")
def gpt2_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved checkpoints: ``base``, experts ``e1``..``e3`` (base + noise), and ``wide`` (n_embd=48)."""
    root = tmp_path_factory.mktemp("gpt2")
    base = tiny_gpt2(0)
    models = {
        "base": base,
        **{f"e{i}": finetuned_like(base, seed=i) for i in (1, 2, 3)},
        "wide": tiny_gpt2(0, n_embd=48),
    }
    out = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        out[name] = root / name
    return out
