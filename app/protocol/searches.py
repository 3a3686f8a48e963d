"""Wire models for /admin/searches: Evo-Merging (and LoraHub) searches run as jobs."""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import (
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    create_model,
    field_validator,
    model_validator,
)

from app.protocol.common import BearerKey, ExpertId, HttpURL, RequestModel, combination_error
from app.protocol.merge_sessions import LossIn, PoolSelector, ValidationIn
from merging.search.settings import BETA_BOUND, MAX_QUERIES, SearchSettings


class ProviderIn(RequestModel):
    """Where the weights live: this gateway (no `url`) or any server with the merge-sessions contract."""

    model_config = ConfigDict(extra="forbid")

    url: HttpURL | None = Field(None, examples=["http://127.0.0.1:8001"],
                            description="Provider root (without /v1), e.g. http://10.0.0.5:8000; omit for this gateway")
    api_key: BearerKey | None = Field(None, description="The provider's client key (Bearer); never stored "
                                      "in the job or returned")
    admin_key: BearerKey | None = Field(None, description="The provider's admin key, needed with `name`: "
                                        "materialising the winner is an admin right on the provider. Used for "
                                        "that one call (api_key if omitted); never stored or returned")
    timeout_s: float = Field(120.0, gt=0, le=3600, description="Per HTTP exchange")
    retries: int = Field(4, ge=0, le=20, description="Extra attempts on connection errors, 429 and 5xx")

    @field_validator("url")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return v.rstrip("/") if v else v


# where the wire type says more than the dataclass: each lambda's box; seeds as the optimisers take them
_WIRE_TYPES: dict[str, Any] = {
    "lambdas": tuple[Annotated[float, Field(strict=True, ge=-BETA_BOUND, le=BETA_BOUND)], ...],
    "seed": Annotated[int, Field(ge=0, le=2**32 - 1)] | None,
}


def _settings_fields() -> dict[str, Any]:
    """One pydantic field per :class:`SearchSettings` field: its type, default, bounds and help (a tuple
    comes as a JSON array: lax about the container, strict about its items)."""
    hints = {**get_type_hints(SearchSettings), **_WIRE_TYPES}
    return {f.name: (hints[f.name], Field(f.default, description=f.metadata["help"], **f.metadata["bounds"],
                                          **({"strict": False} if f.name == "lambdas" else {})))
            for f in fields(SearchSettings)}


class _SearchTarget(RequestModel):
    """What a search runs against: the provider, the base and pool, the validation data and the loss."""

    provider: ProviderIn = ProviderIn()
    base: str = Field(..., description="The base expert (on the provider)")
    pool: list[str] | PoolSelector = Field(..., description="Adapter ids in order, or a tag selector")
    validation: ValidationIn
    loss: LossIn = LossIn()


# the settings, derived from their one declaration (merging.search.settings), after the target's fields
_SearchSettingsIn = create_model("_SearchSettingsIn", __base__=_SearchTarget, **_settings_fields())
SETTING_NAMES = frozenset(f.name for f in fields(SearchSettings))


class SearchRequest(_SearchSettingsIn):  # type: ignore[misc, valid-type]
    """A black-box merge search over a pool of LoRA adapters on one base.

    Evo-Merging (default): stage 1 searches the keep fractions alpha with beta = 1/N, stage 2 the
    signed scales beta with alpha fixed; CMA-ES, objective loss + l1 * mean(|x|). LoraHub: one weight
    per adapter (beta), alpha = 1, nevergrad NGOpt. Ablations: `denoise`, `scale`, `negative` off.
    Baselines through the same job: `uniform`, `task_arithmetic`, `best_single`.
    """

    # the search settings (method ... lambdas) are inherited: the fields of SearchSettings

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "base": "pool-base", "pool": {"tags": ["pool"]},
        "validation": {"task": "dictionary_word", "split": "validation", "max_examples": 32},
        "method": "evo_merging", "budget_stage1": 400, "budget_stage2": 800, "seed": 42,
        "name": "evo-dictionary-word"}]})

    name: ExpertId | None = Field(None, description="Register the winner under this id (omit: search only)",
                             examples=["evo-merged"])
    tags: list[str] = Field(default_factory=list)
    domain: str | None = None

    @field_validator("lambdas")
    @classmethod
    def _lambdas(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not all(-1.5 <= x <= 1.5 for x in v):
            raise ValueError("every lambda must be in [-1.5, 1.5]")
        return v

    @model_validator(mode="after")
    def _budgets(self) -> SearchRequest:
        if self.method == "evo_merging":
            if not (self.denoise or self.scale):
                raise combination_error("nothing to search: denoise and scale are both off")
            if self.budget_stage1 * self.denoise + self.budget_stage2 * self.scale < 1:
                raise combination_error("the search budget is zero")
        return self

    def settings(self) -> SearchSettings:
        """The request's search settings, by name."""
        return SearchSettings(**self.model_dump(include=SETTING_NAMES))


class EnsembleSearchRequest(RequestModel):
    """Search the weights of a black-box ensemble (`mode` score_select or token_mix) through API calls only.

    Every member is called once per validation example (token_mix: the reference's log-probabilities;
    score_select: each candidate member generates an answer, every member scores every answer and the
    reference); then a nevergrad search over weights in [0, 1]^N (normalised to sum 1) minimises the
    objective with no further calls. token_mix objective `loss`: per-token cross-entropy of the
    mixture. score_select: `accuracy` (1 - exact match of the selected answer), `f1` (1 - token F1) or
    `loss` (cross-entropy of picking the reference among the answers, with the ensemble's scores).
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "method": "ensemble_weights", "ensemble": "duo",
        "validation": {"task": "dictionary_define", "max_examples": 16}, "objective": "f1", "budget": 100}]})

    method: Literal["ensemble_weights"]
    ensemble: str = Field(..., description="A black-box ensemble expert (POST /admin/ensembles)")
    validation: ValidationIn = Field(..., description="Inline examples ({prompt, completion}; {text} for "
                                     "token_mix) or a task; corpora are not supported here")
    objective: Literal["loss", "accuracy", "f1"] | None = Field(
        None, description="Default: loss for token_mix, accuracy for score_select")
    optimizer: str = Field("CMA", description="CMA (CMA-ES) or a nevergrad optimizer name, e.g. NGOpt")
    budget: int = Field(100, ge=1, le=MAX_QUERIES, description="Objective evaluations (no API calls)")
    popsize: int = Field(10, ge=2, le=1000)
    sigma0: float = Field(0.1, gt=0, le=1)
    l1: float = Field(0.0, ge=0, le=100)
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = 42
    start: Literal["uniform", "current"] = "uniform"
    early_stop: int | None = Field(None, ge=1)
    max_tokens: int = Field(32, ge=1, le=4096, description="score_select: length of each member's answer")
    stop: list[str] = Field(default_factory=list, max_length=4)
    apply: Literal["if_better", "always", "never"] = Field(
        "if_better", description="Save the weights found on the ensemble: only if they beat its current "
        "weights on the objective (default), always, or never")

    @model_validator(mode="after")
    def _no_corpus(self) -> EnsembleSearchRequest:
        if self.validation.corpus is not None:
            raise combination_error("ensemble searches take inline examples or a task, not a corpus")
        return self


def _search_kind(v: Any) -> str:
    method = v.get("method") if isinstance(v, dict) else getattr(v, "method", None)
    return "as ensemble search" if method == "ensemble_weights" else "as merge search"


AnySearchRequest = Annotated[
    Annotated[SearchRequest, Tag("as merge search")] | Annotated[EnsembleSearchRequest, Tag("as ensemble search")],
    Discriminator(_search_kind),
]
