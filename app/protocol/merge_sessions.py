"""Wire models for /v1/merge/sessions (black-box merge sessions) and /admin/loras/train."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.protocol.btm import BudgetIn
from app.protocol.common import ExpertId, RequestModel, combination_error

Split = Literal["train", "validation", "test"]


class ExampleIn(RequestModel):
    """A prompt/completion pair (only the completion's tokens are scored) or a plain text."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    completion: str | None = None
    text: str | None = None

    @model_validator(mode="after")
    def _one_form(self) -> ExampleIn:
        if (self.text is not None) == (self.completion is not None or self.prompt is not None):
            raise combination_error("give either 'text' or 'prompt' and 'completion'")
        if self.text is None and not self.completion:
            raise combination_error("'completion' must be a non-empty string")
        return self


class ValidationIn(RequestModel):
    """Exactly one of: inline `examples`, a registered `corpus` (+ split), or a `task` (+ split)."""

    model_config = ConfigDict(extra="forbid")

    examples: list[ExampleIn] | None = Field(None, min_length=1, max_length=10_000)
    corpus: str | None = Field(None, description="A corpus name (see /admin/corpora): consecutive windows of "
                               "loss.max_tokens_per_example tokens")
    task: str | None = Field(None, description="A task made from the local corpora, e.g. 'dictionary_define'")
    split: Split = "validation"
    max_examples: int | None = Field(None, ge=1, le=10_000, description="Default 32 for corpus and task")

    @model_validator(mode="after")
    def _one_source(self) -> ValidationIn:
        if sum(x is not None for x in (self.examples, self.corpus, self.task)) != 1:
            raise combination_error("give exactly one of examples, corpus or task")
        return self


class LossIn(RequestModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens_per_example: int = Field(128, ge=2, le=8192,
                                        description="Truncation (capped at the base's context)")
    max_examples: int | None = Field(None, ge=1, le=10_000)
    append_eos: bool = Field(False, description="Score an end-of-text token after each completion")


class PoolSelector(RequestModel):
    model_config = ConfigDict(extra="forbid")

    tags: list[str] = Field(..., min_length=1, description="Every lora expert on the base carrying all these "
                            "tags, ordered by id")


class SessionCreateRequest(RequestModel):
    model_config = ConfigDict(extra="forbid")

    base: str = Field(..., description="The registered base expert", examples=["pool-base"])
    pool: list[str] | PoolSelector = Field(..., description="Adapter ids in order, or a tag selector",
                                           examples=[{"tags": ["pool"]}])
    validation: ValidationIn
    loss: LossIn = LossIn()
    budget: int = Field(2000, ge=1, le=1_000_000, description="Loss queries this session may answer")


class SessionView(BaseModel):
    id: str
    object: str = "merge.session"
    base: str
    n: int = Field(..., description="Number of adapters: alpha and beta have this length")
    experts: list[str] = Field(..., description="The adapters, in the order of alpha and beta")
    budget: int
    used: int
    remaining: int
    created_at: float
    last_used_at: float
    validation: dict[str, Any]
    loss: dict[str, Any]
    alpha_range: list[float]
    beta_range: list[float]


class CandidateIn(RequestModel):
    model_config = ConfigDict(extra="forbid")

    alpha: list[float] = Field(..., description="Keep fraction per adapter, in [0, 1]")
    beta: list[float] = Field(..., description="Scale per adapter, in [-1.5, 1.5]")


class EvaluateView(BaseModel):
    loss: float = Field(..., description="Mean token cross-entropy (nats) on the session's validation data")
    queries_used: int
    queries_left: int


class BatchIn(RequestModel):
    model_config = ConfigDict(extra="forbid")

    candidates: list[CandidateIn] = Field(..., min_length=1, max_length=1000)


class BatchView(BaseModel):
    losses: list[float]
    queries_used: int
    queries_left: int


class MaterializeIn(CandidateIn):
    name: ExpertId = Field(..., description="Id of the expert to register", examples=["evo-merged"])
    tags: list[str] = Field(default_factory=list)
    domain: str | None = None


class SessionDeletedView(BaseModel):
    id: str
    object: str = "merge.session"
    deleted: bool = True


# -- /admin/loras/train --------------------------------------------------------------------------


class LoraDataIn(RequestModel):
    """Exactly one of: a corpus (optionally part [k, K] of its train split), a task, inline examples."""

    model_config = ConfigDict(extra="forbid")

    corpus: str | None = None
    part: tuple[Annotated[int, Field(strict=True, ge=0)], Annotated[int, Field(strict=True, ge=1)]] | None = Field(
        None, strict=False, description="[k, K]: part k (0-based) of K contiguous parts (corpus)")
    task: str | None = None
    examples: list[ExampleIn] | None = Field(None, min_length=1, max_length=100_000)
    validation: list[ExampleIn] | None = Field(None, min_length=1, max_length=10_000)

    @model_validator(mode="after")
    def _one_source(self) -> LoraDataIn:
        if sum(x is not None for x in (self.corpus, self.task, self.examples)) != 1:
            raise combination_error("give exactly one of corpus, task or examples")
        return self


class LoraIn(RequestModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1, le=512)
    lora_alpha: float = Field(16.0, gt=0)
    target_modules: list[str] | None = Field(None, description="Default: peft's choice for the architecture")


class LoraTrainRequest(RequestModel):
    model_config = ConfigDict(extra="forbid")

    id: ExpertId = Field(..., examples=["lora-legal"])
    base: str = Field(..., examples=["pool-base"])
    data: LoraDataIn
    lora: LoraIn = LoraIn()
    budget: BudgetIn = Field(..., description="The LoRA preset (TrainConfig.lora: shorter warm-up, no weight "
                             "decay) with these fields on top")
    tags: list[str] = Field(default_factory=list)
    domain: str | None = None
