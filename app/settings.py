"""Gateway settings, from arguments or `MERGEGATE_*` environment variables."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MERGEGATE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("data")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data_dir>/registry.db")
    admin_key: SecretStr | None = Field(
        None, description="admin key; when unset one is generated into <data_dir>/admin.key")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="client keys, comma-separated")
    max_loaded_models: int = 16
    max_loaded_bytes: int = 8 << 30
    max_body_bytes: int = 4 << 20  # JSON requests
    max_upload_bytes: int = 4 << 30  # expert uploads
    max_concurrent_uploads: int = Field(2, ge=1, description="uploads received or registered at once; beyond "
                                        "it, 429")
    rebind_registry: bool = Field(False, description="bind a registry to this data dir even though their ids "
                                  "differ (for one start; nothing is deleted, orphans are quarantined)")
    fault_pause: str | None = Field(None, description="testing only: '<job kind>:<text>;...' makes such jobs "
                                    "stop for good at their first progress message containing <text> (crash tests)")
    demo: Literal["off", "full", "quick"] = Field(
        "off", description="build the demo repository in a background job at start-up (`mergegate demo` sets "
        "it): full, or quick (tiny models, for tests)")
    body_timeout_s: float = Field(30.0, gt=0, description="seconds to wait for the next piece of a request body "
                                  "before answering 408 and closing the connection")
    metrics: Literal["admin", "open", "off"] = Field(
        "admin", description="/metrics exposure: admin (the admin key), open (no key) or off (404)")
    max_n: int = 16
    # The batching engine (docs/engine.md), per loaded model.
    max_batch_size: int = Field(64, ge=1, description="rows (choices) decoding at once")
    max_batched_tokens: int = Field(1024, ge=1, description="tokens through the model per step: decoding rows "
                                    "plus one chunk of prefill")
    max_queue: int = Field(256, ge=1, description="prompts waiting for a place; beyond it requests get 429")
    admit_window_ms: float = Field(0.0, ge=0, le=1000, description="an idle model waits this long for more "
                                   "prompts, so a burst is prefilled as one batch")
    gpt2_kernel: bool = Field(True, description="run plain GPT-2 models on the engine's own kernel (the same "
                              "answers as the transformers module, less overhead per step); false: the module")
    engine_threads: int = Field(0, ge=0, description="torch threads of the engine's forward passes (0: every "
                                "core torch sees); fewer leave cores to the HTTP server on a small machine")
    job_workers: int = 2
    # Replicas sharing one database and data dir (docs/scaling.md).
    job_lease_s: float = Field(30.0, gt=0, description="a job's lease: its replica renews it every heartbeat; "
                               "past it, another replica fails the job")
    heartbeat_s: float = Field(5.0, gt=0, description="seconds between heartbeats: renew leases, fail abandoned "
                               "jobs, drop models changed or deleted on another replica")
    # Heavy jobs on Ray (docs/scaling.md; the `ray` extra).
    runner: Literal["local", "ray"] = Field(
        "local", description="where BTM first rounds and search generations run: local (this process's job "
        "threads) or ray (parallel Ray tasks and actors)")
    ray_address: str | None = Field(
        None, description="with runner=ray: the cluster to join ('auto', 'host:6379', 'ray://host:10001'); "
        "unset: start a local Ray with this machine's CPUs")
    ray_workers: int | None = Field(
        None, ge=1, description="with runner=ray: tasks or actors one job uses at once; unset: the cluster's CPUs")
    max_merge_sessions: int = 8  # Evo-Merging sessions open at once (provider side)
    default_dtype: str | None = None
    corpus_bytes: int = 2_000_000  # text per built-in domain corpus (all splits), for BTM and evaluation
    log_level: str = "info"
    remote_max_connections: int = 512  # the pool shared by all remote experts
    remote_max_keepalive: int = 128

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> Settings:
        if self.heartbeat_s * 2 > self.job_lease_s:
            raise ValueError(f"MERGEGATE_HEARTBEAT_S ({self.heartbeat_s}) must be at most half of "
                             f"MERGEGATE_JOB_LEASE_S ({self.job_lease_s}), or live jobs would lose their lease")
        return self

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'registry.db').resolve()}"

    @property
    def admin_key_file(self) -> Path:
        return self.data_dir / "admin.key"


def resolve_admin_key(settings: Settings) -> str:
    """The configured admin key, else the one stored in <data_dir>/admin.key (created 0600 on first start).

    Admin is therefore never open: without a configured key, only someone who can read the data
    dir can administer the gateway."""
    if settings.admin_key is not None and settings.admin_key.get_secret_value():
        return settings.admin_key.get_secret_value()
    path = settings.admin_key_file
    if path.is_file():
        key = path.read_text().strip()
        if key:
            return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "mg-admin-" + secrets.token_urlsafe(24)
    tmp = path.with_suffix(".tmp")
    tmp.touch(mode=0o600)
    tmp.write_text(key + "\n")
    tmp.replace(path)
    return key
