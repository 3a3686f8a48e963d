"""merging/recipe.py: validation against the method's ParamSpecs, and JSON round-trips."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from merging.errors import InvalidRecipeError
from merging.recipe import MergeRecipe, load_recipe


def recipe(**kw: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "method": "ties",
        "base": "base",
        "experts": [{"id": "e1", "weight": 0.5, "density": 0.3}, {"id": "e2"}],
    }
    data.update(kw)
    return data


def test_json_round_trip_and_resolution() -> None:
    r = MergeRecipe(**recipe(parameters={"density": 0.7, "normalize": False}, dtype="bfloat16", seed=3))
    again = MergeRecipe.model_validate_json(r.model_dump_json())
    assert again == r
    assert load_recipe(r.model_dump_json()) == r
    assert r.expert_parameters() == [{"weight": 0.5, "density": 0.3}, {"weight": 1.0, "density": 0.7}]
    assert r.resolved_parameters() == {"lambda": 1.0, "normalize": False}
    assert r.expert_ids == ["e1", "e2"] and str(r.torch_dtype) == "torch.bfloat16" and r.effective_seed == 3
    assert MergeRecipe(**recipe()).effective_seed == 0


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"experts": [{"id": "e1", "density": 1.5}]}, "density"),
        ({"method": "evo", "experts": [{"id": "e1", "alpha": 0.5, "beta": 2.0}]}, "beta"),
        ({"method": "evo", "experts": [{"id": "e1", "alpha": -0.1}]}, "alpha"),
        ({"method": "evo", "experts": [{"id": "e1", "weight": 1.0}]}, "weight"),
        ({"parameters": {"lambda": 100}}, "lambda"),
        ({"parameters": {"t": 0.5}}, "'t'"),
        ({"parameters": {"normalize": 0.5}}, "normalize"),
        ({"method": "nope"}, "unknown merge method"),
        ({"base": None}, "needs a base"),
        ({"experts": [{"id": "base"}]}, "must not also be listed"),
        ({"experts": [{"id": "e1"}, {"id": "e1"}]}, "more than once"),
        ({"experts": []}, "experts"),
        ({"method": "slerp", "experts": [{"id": "e1"}, {"id": "e2"}]}, "exactly two"),
        (
            {
                "method": "linear",
                "base": None,
                "experts": [{"id": "a", "weight": 1}, {"id": "b", "weight": -1}],
            },
            "sum to 0",
        ),
        ({"dtype": "float64"}, "dtype"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_recipes_name_the_problem(change: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        MergeRecipe(**recipe(**change))
    with pytest.raises(InvalidRecipeError, match=needle):
        load_recipe(recipe(**change))


def test_valid_variants() -> None:
    MergeRecipe(method="slerp", base="a", experts=[{"id": "b"}], parameters={"t": 0.3})
    MergeRecipe(method="slerp", experts=[{"id": "a"}, {"id": "b"}])
    MergeRecipe(method="linear", experts=[{"id": "a"}])  # base optional for linear
    MergeRecipe(
        method="evo",
        base="b",
        experts=[{"id": "a", "alpha": 0.0, "beta": -1.5}],
        parameters={"sparsify_b": True},
    )
    MergeRecipe(method="cat", experts=[{"id": "a", "weight": 0.5}, {"id": "b"}])
