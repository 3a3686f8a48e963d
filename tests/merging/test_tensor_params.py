"""Parameters that vary by tensor: gradients over layers and filters, as mergekit resolves them."""

from __future__ import annotations

import pytest
import torch

from merging.apply import merge_tensors
from merging.errors import InvalidRecipeError
from merging.recipe import load_recipe
from merging.sources import DictSource
from merging.tensor_params import Condition, evaluate_setting, layer_index, layer_positions

NAMES = ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight",
         "transformer.h.2.attn.c_attn.weight", "transformer.ln_f.weight"]


def test_layer_positions_spread_over_the_stack_and_put_the_rest_at_zero():
    assert layer_index("model.layers.12.self_attn.q_proj.weight") == 12 and layer_index("lm_head.weight") is None
    assert layer_positions(NAMES) == {NAMES[0]: 0.0, NAMES[1]: 0.0, NAMES[2]: 0.5, NAMES[3]: 1.0, NAMES[4]: 0.0}
    assert layer_positions(["h.0.w", "emb"]) == {"h.0.w": 1.0, "emb": 0.0}  # one layer: t = 1, as mergekit


def test_gradients_interpolate_and_filters_pick_the_first_match():
    assert evaluate_setting([0.0, 0.5, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert evaluate_setting([1, 0.7, 0.1], "x", 0.75) == pytest.approx(0.4)
    conds = [Condition(filter="mlp", value=[0.0, 1.0]), Condition(filter="attn", value=0.2)]
    assert evaluate_setting(conds, "h.1.mlp.c_fc.weight", 0.5) == pytest.approx(0.5)
    assert evaluate_setting(conds, "h.1.attn.c_attn.weight", 0.5) == 0.2
    assert evaluate_setting(conds, "wte.weight", 0.0) is None  # falls through to the next precedence level


def test_same_values_as_mergekits_evaluate_setting():
    config = pytest.importorskip("mergekit.config")
    settings = [0.3, [0, 0.3, 0.7, 1], [1, 0.7, 0.1],
                [{"filter": "mlp", "value": 0.5}, {"value": 0}],
                [{"filter": "attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5]}]]
    for raw in settings:
        theirs_setting = ([config.ConditionalParameter(**c) for c in raw]
                          if isinstance(raw, list) and isinstance(raw[0], dict) else raw)
        ours_setting = [Condition(**c) for c in raw] if isinstance(raw, list) and isinstance(raw[0], dict) else raw
        for name in ("h.3.mlp.c_fc.weight", "h.3.attn.c_proj.bias", "wte.weight"):
            for t in (0.0, 0.2, 0.5, 0.9, 1.0):
                theirs = config.evaluate_setting(name, theirs_setting, t, validate=float)
                ours = evaluate_setting(ours_setting, name, t)
                assert (ours is None and theirs is None) or ours == pytest.approx(theirs), (raw, name, t)


def test_a_weight_gradient_merges_each_layer_with_its_own_weight():
    """Hand-computed: linear, un-normalised; expert b's weight goes 0 -> 1 over layers 0..2."""
    one = {n: torch.ones(2) for n in NAMES}
    two = {n: 2 * torch.ones(2) for n in NAMES}
    recipe = load_recipe({"method": "linear", "parameters": {"normalize": False},
                          "experts": [{"id": "a", "weight": 1.0},
                                      {"id": "b", "per_tensor": {"weight": [0.0, 1.0]}}]})
    out = dict(merge_tensors(recipe, {"a": DictSource(one), "b": DictSource(two)}))
    # 1 * 1 + w_b * 2 with w_b = t: layers 0, 1, 2 at t = 0, 0.5, 1; embeddings and final norm at t = 0
    expected = {NAMES[0]: 1.0, NAMES[1]: 1.0, NAMES[2]: 2.0, NAMES[3]: 3.0, NAMES[4]: 1.0}
    for name, v in expected.items():
        torch.testing.assert_close(out[name], torch.full((2,), v), msg=name)


def test_recipe_wide_filters_are_every_experts_default():
    src = {n: torch.ones(2) for n in NAMES}
    recipe = load_recipe({"method": "linear", "parameters": {"normalize": False},
                          "experts": [{"id": "a"}, {"id": "b", "weight": 0.5}],
                          "per_tensor": {"weight": [{"filter": "attn", "value": 2.0}, {"value": 1.0}]}})
    out = dict(merge_tensors(recipe, {"a": DictSource(src), "b": DictSource(src)}))
    assert out[NAMES[1]].tolist() == [2.5, 2.5]  # a: 2 (filter), b: its own 0.5
    assert out[NAMES[2]].tolist() == [1.5, 1.5]  # a: 1 (scalar default), b: 0.5


@pytest.mark.parametrize("bad,needle", [
    ({"experts": [{"id": "a", "per_tensor": {"normalize": [0, 1]}}]}, "'normalize'"),
    ({"experts": [{"id": "a", "weight": 1.0, "per_tensor": {"weight": [0, 1]}}]}, "both as a scalar"),
    ({"experts": [{"id": "a", "per_tensor": {"weight": [0, 99]}}]}, "out of range"),
    ({"experts": [{"id": "a"}], "per_tensor": {"normalize": [0.0, 1.0]}}, "flag"),
])
def test_bad_per_tensor_settings_are_refused_by_name(bad, needle):
    with pytest.raises(InvalidRecipeError, match=needle):
        load_recipe({"method": "linear", **bad})
