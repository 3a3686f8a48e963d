"""Tests of the training config (experts/training/config.py): budgets, validation, the learning-rate schedule."""

from __future__ import annotations

import itertools

import pytest

from experts.training.config import TrainConfig


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"max_tokens": 0},
        {"max_tokens": -5},
        {"max_seconds": 0},
        {"max_seconds": -1.0},
        {"max_seconds": float("nan")},
        {"max_seconds": float("inf")},
        {"max_tokens": 0, "max_seconds": 1.0},
        {"max_tokens": 100, "batch_size": 0},
        {"max_tokens": 100, "seq_len": 0},
        {"max_tokens": 100, "schedule": "step"},
        {"max_tokens": 100, "min_lr_ratio": 1.5},
        {"max_tokens": 100, "lr": 0},
    ],
)
def test_bad_config_is_rejected(kw):
    with pytest.raises(ValueError):
        TrainConfig(**kw)


def test_either_budget_alone_is_enough():
    assert TrainConfig(max_tokens=1).max_seconds is None
    assert TrainConfig(max_seconds=0.5).max_tokens is None
    assert TrainConfig(max_tokens=10, max_seconds=1.0).bf16 is True


def test_lr_schedule_warms_up_then_decays():
    c = TrainConfig(max_tokens=1000, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert c.lr_at(0, 0.0) == pytest.approx(0.1)
    assert c.lr_at(9, 0.0) == pytest.approx(1.0)
    assert c.lr_at(50, 0.5) == pytest.approx(0.55)
    assert c.lr_at(100, 1.0) == pytest.approx(0.1)
    lrs = [c.lr_at(s, s / 100) for s in range(10, 100)]
    assert all(x >= y for x, y in itertools.pairwise(lrs))
    cos = TrainConfig(max_tokens=1000, lr=1.0, warmup_steps=0, min_lr_ratio=0.0, schedule="cosine")
    assert cos.lr_at(0, 0.0) == pytest.approx(1.0)
    assert cos.lr_at(5, 0.5) == pytest.approx(0.5)
    assert cos.lr_at(9, 1.0) == pytest.approx(0.0)
