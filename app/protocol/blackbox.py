"""Wire models for /admin/ensembles: black-box ensembles of local and remote experts."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.protocol.admin import ExpertView
from app.protocol.common import ExpertId, RequestModel


class MemberIn(RequestModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., description="A registered expert: local, lora, remote, or a BTM forest")
    weight: float | None = Field(None, ge=0, description="This member's weight (or give `weights`)")


class RegisterEnsembleRequest(RequestModel):
    """An `ensemble` expert whose members may be local or remote (black-box)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"id": "duo", "mode": "score_select", "members": ["gpt-mini", "demo-code"], "weights": [0.5, 0.5]},
        {"id": "mix", "mode": "token_mix",
         "members": [{"id": "vllm-a", "weight": 2}, {"id": "demo-code", "weight": 1}]},
    ]})

    id: ExpertId = Field(..., examples=["duo"])
    mode: Literal["score_select", "token_mix"] = Field(
        ..., description="score_select: candidates scored by every member, the best weighted length-normalised "
                         "log-likelihood wins (any tokenizers). token_mix: next-token distributions mixed per step "
                         "(members must share a tokenizer)")
    members: list[str | MemberIn] = Field(..., min_length=1, description="Expert ids, or {id, weight}")
    weights: list[float] | None = Field(None, description="One per member; normalised to sum 1 (default: equal)")
    candidates: list[str] | None = Field(None, description="score_select: the members that generate a candidate "
                                                           "(default: all)")
    top_logprobs: int | None = Field(None, description="token_mix: alternatives asked of each member per step "
                                                       "(default 5, at most 20)")
    tags: list[str] | None = None
    domain: str | None = None

    def member_list(self) -> list[str | dict]:
        return [m if isinstance(m, str) else m.model_dump() for m in self.members]


class PatchEnsembleRequest(RequestModel):
    """Set the weights by hand (or the candidates, or top_logprobs); the members stay."""

    model_config = ConfigDict(extra="forbid")

    weights: list[float] | None = None
    candidates: list[str] | None = None
    top_logprobs: int | None = None


class EnsembleList(BaseModel):
    object: str = "list"
    data: list[ExpertView]
