"""Found by tests/test_fuzz.py: a tiny positive temperature (allowed: temperature >= 0) made sampling divide
logits into inf/NaN, a 503 'probability tensor contains inf or nan' for local models and a division by zero
for token_mix ensembles. Both now pick the most likely token, as the limit of sampling says."""

from __future__ import annotations

import random

import pytest
import torch

from experts.base import GenerationParams
from experts.blackbox.maths import choose
from experts.hf.generation import sample


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-40, 1e-6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_tiny_temperature_samples_the_argmax(temperature, dtype):
    logits = torch.tensor([[1.0, 7.5, -3.0, 7.0], [60.0, -60.0, 0.0, 59.0]], dtype=dtype)
    params = GenerationParams(max_tokens=1, temperature=temperature, top_p=0.5)
    for seed in range(5):
        got = sample(logits, params, torch.Generator().manual_seed(seed))
        assert got.tolist() == [1, 0]


def test_sampling_at_ordinary_temperatures_still_spreads():
    logits = torch.zeros(1, 4)
    params = GenerationParams(max_tokens=1, temperature=1.0)
    seen = {int(sample(logits, params, torch.Generator().manual_seed(s))) for s in range(40)}
    assert len(seen) == 4


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-3])
def test_token_mix_with_a_tiny_temperature_picks_the_most_likely_token(temperature):
    mixed = {"a": 0.2, "b": 0.45, "c": 0.35}
    assert {choose(mixed, temperature=temperature, top_p=1.0, rng=random.Random(s)) for s in range(10)} == {"b"}


@pytest.mark.parametrize("top_p", [5e-324, 1e-50, 1e-9])
def test_a_tiny_top_p_keeps_the_most_likely_token(top_p):
    """Also found by the fuzz: top_p 5e-324 is 0 as a float32, so the nucleus dropped every token."""
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    params = GenerationParams(max_tokens=1, temperature=1.0, top_p=top_p)
    assert [int(sample(logits, params, torch.Generator().manual_seed(s))) for s in range(5)] == [1] * 5
    assert choose({"a": 0.2, "b": 0.5, "c": 0.3}, temperature=1.0, top_p=top_p, rng=random.Random(0)) == "b"


def test_a_request_without_a_seed_gets_a_fresh_one_in_the_generators_range():
    assert GenerationParams(seed=-5).sampling_seed() == -5
    fresh = {GenerationParams().sampling_seed() for _ in range(50)}
    assert len(fresh) == 50 and all(0 <= s < 2**63 for s in fresh)
    torch.Generator().manual_seed(max(fresh))  # a seed torch takes
