"""One training config: the API's budget model takes TrainConfig's defaults and converts into it by name."""

from __future__ import annotations

from dataclasses import fields

import pytest
from pydantic import ValidationError

from app.protocol.btm import BudgetIn
from experts.training.config import LORA_PRESET, TrainConfig

DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def test_the_api_budget_is_a_subset_of_train_config_with_its_defaults():
    assert set(BudgetIn.model_fields) <= set(DEFAULTS)
    for name, field in BudgetIn.model_fields.items():
        assert field.default == DEFAULTS[name], name
    schema = BudgetIn.model_json_schema()["properties"]
    assert schema["lr"]["default"] == TrainConfig.lr
    assert schema["batch_size"]["default"] == TrainConfig.batch_size


def test_conversion_is_by_name_never_by_position():
    # every value distinct, so a positional conversion (or a swapped pair) would show
    given = {"max_tokens": 1000, "max_seconds": 7.5, "batch_size": 3, "seq_len": 17, "lr": 0.004, "seed": 11}
    assert set(given) == set(BudgetIn.model_fields)
    config = BudgetIn(**given).config()
    assert isinstance(config, TrainConfig)
    for name, value in DEFAULTS.items():
        assert getattr(config, name) == given.get(name, value), name
    lora = BudgetIn(**given).config(TrainConfig.lora)
    for name, value in DEFAULTS.items():
        assert getattr(lora, name) == given.get(name, LORA_PRESET.get(name, value)), name


def test_the_api_refuses_what_train_config_refuses():
    with pytest.raises(ValidationError, match="max_tokens"):
        BudgetIn()
    with pytest.raises(ValueError):
        TrainConfig()
    assert BudgetIn(max_seconds=2).config() == TrainConfig(max_seconds=2)


def test_the_lora_preset_is_one_named_declaration():
    preset = TrainConfig.lora(max_tokens=100)
    assert (preset.lr, preset.warmup_steps, preset.weight_decay) == (3e-3, 10, 0.0)
    assert {k: getattr(preset, k) for k in LORA_PRESET} == dict(LORA_PRESET)
    assert TrainConfig.lora(max_tokens=100, lr=1e-2).lr == 1e-2  # the caller's fields win
    assert preset.eval_every == TrainConfig.eval_every and preset.batch_size == TrainConfig.batch_size
    with pytest.raises(TypeError):
        LORA_PRESET["lr"] = 1.0  # read-only: the preset is declared once
