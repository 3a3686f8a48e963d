"""Wire models for /admin/searches: Evo-Merging (and LoraHub) searches run as jobs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from app.protocol.merge_sessions import LossIn, PoolSelector, ValidationIn

MAX_QUERIES = 20_000


class ProviderIn(BaseModel):
    """Where the weights live: this gateway (no `url`) or any server with the merge-sessions contract."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, description="Provider root (without /v1), e.g. http://10.0.0.5:8000; "
                            "omit for this gateway", examples=["http://127.0.0.1:8001"])
    api_key: SecretStr | None = Field(None, description="The provider's client key (Bearer); never stored "
                                      "in the job or returned")
    timeout_s: float = Field(120.0, gt=0, le=3600, description="Per HTTP exchange")
    retries: int = Field(4, ge=0, le=20, description="Extra attempts on connection errors, 429 and 5xx")

    @field_validator("url")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return v.rstrip("/") if v else v


class SearchRequest(BaseModel):
    """A black-box merge search over a pool of LoRA adapters on one base.

    Evo-Merging (default): stage 1 searches the keep fractions alpha with beta = 1/N, stage 2 the
    signed scales beta with alpha fixed; CMA-ES, objective loss + l1 * mean(|x|). LoraHub: one weight
    per adapter (beta), alpha = 1, nevergrad NGOpt. Ablations: `denoise`, `scale`, `negative` off.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "base": "pool-base", "pool": {"tags": ["pool"]},
        "validation": {"task": "dictionary_word", "split": "validation", "max_examples": 32},
        "method": "evo_merging", "budget_stage1": 400, "budget_stage2": 800, "seed": 42,
        "name": "evo-dictionary-word"}]})

    provider: ProviderIn = ProviderIn()
    base: str = Field(..., description="The base expert (on the provider)")
    pool: list[str] | PoolSelector = Field(..., description="Adapter ids in order, or a tag selector")
    validation: ValidationIn
    loss: LossIn = LossIn()
    method: Literal["evo_merging", "lorahub"] = "evo_merging"
    seed: int | None = Field(42, description="Seeds the optimisers: same request and seed, same result")
    budget_stage1: int = Field(400, ge=0, le=MAX_QUERIES, description="Evo stage 1 (alpha) evaluations")
    budget_stage2: int = Field(800, ge=0, le=MAX_QUERIES, description="Evo stage 2 (beta) evaluations")
    budget: int = Field(40, ge=1, le=MAX_QUERIES, description="LoraHub evaluations")
    popsize: int = Field(20, ge=2, le=1000, description="CMA-ES population (a generation)")
    sigma0: float = Field(0.05, gt=0, le=10, description="CMA-ES initial step, in value units")
    l1: float = Field(0.05, ge=0, le=100, description="Weight of mean(|x|) in the objective")
    early_stop: int | None = Field(None, ge=1, description="End a stage after this many generations without "
                                   "improvement")
    early_stop_min_delta: float = Field(0.0, ge=0)
    denoise: bool = Field(True, description="Run stage 1 (False: alpha = 1; ablation)")
    scale: bool = Field(True, description="Run stage 2 (False: beta = 1/N; ablation)")
    negative: bool = Field(True, description="Allow beta < 0 (False: beta in [0, 1.5]; ablation)")
    selection: Literal["shared", "last_stage"] = Field(
        "shared", description="shared: best-ever candidate across stages (authors' code); last_stage: the "
        "last stage's best")
    optimizer: str = Field("NGOpt", description="LoraHub's nevergrad optimizer")
    name: str | None = Field(None, description="Register the winner under this id (omit: search only)",
                             examples=["evo-merged"])
    tags: list[str] = Field(default_factory=list)
    domain: str | None = None

    @model_validator(mode="after")
    def _budgets(self) -> SearchRequest:
        if self.method == "evo_merging":
            if not (self.denoise or self.scale):
                raise ValueError("nothing to search: denoise and scale are both off")
            if self.budget_stage1 * self.denoise + self.budget_stage2 * self.scale < 1:
                raise ValueError("the search budget is zero")
        return self


class SearchView(BaseModel):
    """The job created for a search (follow it at /admin/jobs/{id} or /admin/jobs/{id}/events)."""

    id: str
    object: str = "job"
    kind: str
    status: str
    params: dict
