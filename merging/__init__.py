"""MergeGate's merge library: pure tensor merges, recipes, tensor-by-tensor application and
the fast in-memory Evo path. Imports neither ``app`` nor ``experts``.

Modules: :mod:`merging.ops` (primitives), :mod:`merging.methods` (registry + per-tensor
methods), :mod:`merging.lora` (LoRA-factor forms), :mod:`merging.recipe` (``MergeRecipe``),
:mod:`merging.sources` / :mod:`merging.apply` (whole-model merges), :mod:`merging.evo`
(``EvoPlan`` for search), :mod:`merging.errors`.
"""

from merging.apply import check_compatible, check_tokenizers, estimate, merge_tensors
from merging.errors import IncompatibleExpertsError, InvalidRecipeError, MergeError, UnknownMergeMethodError
from merging.evo import EvoPlan
from merging.methods import METHODS, MergeMethod, ParamSpec, get_method, merge_tensor
from merging.recipe import MergeRecipe, RecipeExpert, load_recipe
from merging.sources import DictSource, SafetensorsSource, TensorSource

__all__ = [
    "METHODS",
    "DictSource",
    "EvoPlan",
    "IncompatibleExpertsError",
    "InvalidRecipeError",
    "MergeError",
    "MergeMethod",
    "MergeRecipe",
    "ParamSpec",
    "RecipeExpert",
    "SafetensorsSource",
    "TensorSource",
    "UnknownMergeMethodError",
    "check_compatible",
    "check_tokenizers",
    "estimate",
    "get_method",
    "load_recipe",
    "merge_tensor",
    "merge_tensors",
]
