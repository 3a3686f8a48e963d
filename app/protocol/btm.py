"""Wire models for /admin/btm, /admin/corpora and /admin/evaluate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import Field, model_validator

from app.protocol.common import ExpertId, RequestModel, combination_error
from experts.repository.store import ID_PATTERN
from experts.training.config import TrainConfig


class BudgetIn(RequestModel):
    """A training budget on the wire: the fields of :class:`experts.training.config.TrainConfig` a client
    sets, under the same names and with TrainConfig's own defaults (read from the dataclass, never restated
    here); the rest of the config keeps TrainConfig's (or the preset's) values. :meth:`config` validates it
    into a TrainConfig by name, and TrainConfig's own checks run at the boundary (a 4xx, not a failed job)."""

    max_tokens: int | None = Field(TrainConfig.max_tokens, gt=0,
                                   description="Training tokens (steps x batch x sequence length)")
    max_seconds: float | None = Field(TrainConfig.max_seconds, gt=0, description="Wall-clock budget")
    batch_size: int = Field(TrainConfig.batch_size, ge=1, le=512)
    seq_len: int = Field(TrainConfig.seq_len, ge=8, le=8192)
    lr: float = Field(TrainConfig.lr, gt=0, le=1)
    seed: int = Field(TrainConfig.seed, ge=0, lt=2**63)

    @model_validator(mode="after")
    def _valid_config(self) -> BudgetIn:
        try:
            self.config()  # TrainConfig's own checks (e.g. neither max_tokens nor max_seconds): a 400
        except ValueError as e:
            raise combination_error(str(e)) from None
        return self

    def config(self, preset: Callable[..., TrainConfig] = TrainConfig) -> TrainConfig:
        """This budget as a TrainConfig, by field name: `preset` (TrainConfig, or TrainConfig.lora) with the
        budget's fields on top."""
        return preset(**self.model_dump())


class SizeIn(RequestModel):
    n_layer: int = Field(4, ge=1, le=48)
    n_embd: int = Field(256, ge=16, le=4096)
    n_head: int = Field(4, ge=1, le=64)
    n_positions: int = Field(256, ge=16, le=8192)
    vocab_size: int = Field(4096, ge=300, le=65536)


class SeedRequest(RequestModel):
    id: ExpertId = Field(..., examples=["btm-seed"])
    domains: list[str] = Field(..., min_length=1, examples=[["code", "legal", "scripture"]])
    budget: BudgetIn
    size: SizeIn = SizeIn()


class BranchRequest(RequestModel):
    id: ExpertId = Field(..., examples=["legal-init"])
    parents: list[str] = Field(..., min_length=1)
    domain: str | None = Field(None, description="New domain; its sample gives the default weights")
    weights: list[float] | None = Field(None, description="Explicit weights (default: the parents' domain posterior)")
    prior_split: Literal["train", "validation", "test"] = Field(
        "validation", description="Held-out data of the new domain for the default weights (spec §1.3, §2.3)")
    prior_sequences: int = Field(100, ge=1, le=1000, description="Dev sequences for the default weights")


class TrainRequest(RequestModel):
    id: ExpertId = Field(..., examples=["btm-legal"])
    source: str = Field(..., description="Expert to continue training")
    domain: str
    budget: BudgetIn
    resume: bool = Field(False, description="Resume the source's optimizer state and schedule (a seed's)")


class PriorIn(RequestModel):
    corpus: str | None = Field(None, description="Target data for the cached prior (a corpus name)")
    split: Literal["train", "validation", "test"] = "validation"
    sequences: int = Field(100, ge=1, le=1000, description="Sequences for the cached prior (spec §2.3: 100)")
    weights: list[float] | None = Field(None, description="An explicit prior instead")


class ForestRequest(RequestModel):
    id: ExpertId = Field(..., examples=["btm-forest"])
    members: list[str] = Field(..., min_length=1)
    prior: PriorIn = PriorIn()
    top_k: int | None = Field(None, ge=1)
    posterior: Literal["paper", "reference"] = "paper"


class AddMemberRequest(RequestModel):
    expert: str


class AverageRequest(RequestModel):
    id: ExpertId = Field(..., examples=["btm-average"])
    weighting: Literal["uniform", "prior"] = "uniform"


class PipelinePrior(RequestModel):
    corpus: str | None = Field(None, description="Target data for the cached prior (a corpus name)")
    split: Literal["train", "validation", "test"] = "validation"
    sequences: int = Field(100, ge=1, le=1000)


class PipelineRequest(RequestModel):
    prefix: str = Field(..., examples=["btm"], pattern=ID_PATTERN.pattern, max_length=64,
                        description="Ids: <prefix>-seed, <prefix>-<domain>, <prefix>-forest")
    domains: list[str] = Field(..., min_length=1, examples=[["code", "legal"]])
    budget: BudgetIn = Field(..., description="Total budget; the seed takes seed_fraction of it")
    seed_fraction: float = Field(0.5, gt=0, lt=1)
    size: SizeIn = SizeIn()
    top_k: int | None = Field(None, ge=1)
    averages: bool = True
    branch_from: Literal["seed", "posterior"] = Field(
        "seed", description="seed: every first-round expert copies the seed (the paper); posterior: sequential")
    batch_split: Literal["paper", "full"] = Field(
        "paper", description="paper: experts take the dense second half's updates at 1/n of the batch; "
                             "full: the full batch for 1/n of those updates")
    prior: PipelinePrior = Field(default_factory=lambda: PipelinePrior(),
                                 description="Target data for the forest's cached prior (default: uniform)")


class EvaluateRequest(RequestModel):
    model: str
    corpus: str | None = Field(None, description="A corpus name (with split), or give text")
    split: Literal["train", "validation", "test"] = "test"
    text: str | None = None
    context_length: int = Field(128, ge=8, le=8192)
    stride: int = Field(64, ge=1)
    max_tokens: int | None = Field(None, gt=0, description="Evaluate only the first N tokens")

    @model_validator(mode="after")
    def _one_source(self) -> EvaluateRequest:
        if (self.corpus is None) == (self.text is None):
            raise combination_error("give exactly one of corpus or text")
        if self.stride > self.context_length:
            raise combination_error("stride must not exceed context_length")
        return self
