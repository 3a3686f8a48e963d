"""Wire models for remote experts: registration and PATCH. Bounds and defaults live in experts.remote.upstream."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from app.protocol.admin import ExpertView
from app.protocol.common import BearerKey, ExpertId, HttpURL, RequestModel
from experts.remote.upstream import SPEC_DEFAULTS as D

SPEC_KEYS = {"base_url", "model", "timeouts", "max_concurrency", "max_retries", "fallbacks", "retry", "breaker"}


class _Strict(RequestModel):
    model_config = ConfigDict(extra="forbid")


class Timeouts(_Strict):
    connect: float | None = Field(None, description=f"Seconds to connect (default {D['connect_timeout_s']})")
    read: float | None = Field(None, description="Seconds to wait for the next bytes: the first byte, or the next "
                                                 f"chunk of a stream (default {D['read_timeout_s']})")


class RetryPolicy(_Strict):
    backoff_base_s: float | None = Field(None, description=f"First backoff (default {D['backoff_base_s']}); doubles "
                                                           "per retry, with jitter")
    backoff_max_s: float | None = Field(None, description=f"Longest backoff (default {D['backoff_max_s']})")
    retry_after_cap_s: float | None = Field(
        None, description=f"A Retry-After longer than this is not waited for; the call fails over instead "
                          f"(default {D['retry_after_cap_s']})")


class BreakerPolicy(_Strict):
    threshold: int | None = Field(None, description="Consecutive failures that open the breaker "
                                                    f"(default {D['breaker_threshold']})")
    cooldown_s: float | None = Field(None, description="Seconds open before one probe is let through "
                                                       f"(default {D['breaker_cooldown_s']})")


class RemoteSettings(_Strict):
    base_url: HttpURL | None = Field(None, description="The upstream's OpenAI base URL, as given to the openai client",
                                 examples=["http://127.0.0.1:9000/v1"])
    model: str | None = Field(None, description="The upstream's model name", examples=["gpt-4o-mini"])
    timeouts: Timeouts | None = None
    max_concurrency: int | None = Field(None, description=f"Concurrent calls to this upstream (default "
                                                          f"{D['max_concurrency']}); more wait for a slot")
    max_retries: int | None = Field(None, description=f"Retries on connection errors, 429 and 5xx "
                                                      f"(default {D['max_retries']})")
    fallbacks: list[str] | None = Field(None, description="Expert ids (remote or local) tried in order when this "
                                                          "one fails or its breaker is open")
    retry: RetryPolicy | None = None
    breaker: BreakerPolicy | None = None

    def spec_fields(self) -> dict[str, Any]:
        return self.model_dump(include=SPEC_KEYS, exclude_none=True)


class RegisterRemoteRequest(RemoteSettings):
    """Register an OpenAI-compatible upstream as a `remote` expert."""

    id: ExpertId = Field(..., description="Unique expert id", examples=["gpt-mini"])
    base_url: HttpURL = Field(..., description="The upstream's OpenAI base URL, as given to the openai client",
                          examples=["http://127.0.0.1:9000/v1"])
    model: str = Field(..., description="The upstream's model name", examples=["gpt-4o-mini"])
    api_key: BearerKey | None = Field(None, description="Sent as 'Authorization: Bearer'; stored in "
                                                        "<data_dir>/secrets, never returned")
    tags: list[str] = Field(default_factory=list)
    domain: str | None = None
    check: bool = Field(True, description="Verify the upstream first (GET /models, else a one-token completion)")


class PatchExpertRequest(RemoteSettings):
    """Change a remote expert: rotate its key (`"api_key": null` removes it), timeouts, fallbacks...

    A new `base_url` needs the key for that upstream in the same request (`api_key`), or
    `"keep_key": true` to send the stored key there: the stored key never follows a URL change silently."""

    api_key: BearerKey | None = None
    keep_key: bool = Field(False, description="With a new base_url: send the stored key to the new upstream "
                                              "(otherwise a new base_url needs api_key)")
    tags: list[str] | None = None
    domain: str | None = None
    check: bool = Field(False, description="Verify the upstream with the new settings before saving them")


class RemoteExpertView(ExpertView):
    check: dict[str, Any] | None = Field(None, description="What the upstream check found")
