"""Registering and changing remote experts. Keys go to the SecretStore, never into the registry row."""

from __future__ import annotations

import asyncio
from typing import Any

from app.protocol.remote import PatchExpertRequest, RegisterRemoteRequest
from experts.base import ExpertKind
from experts.errors import ExpertExistsError, InvalidExpertError
from experts.remote.check import check_upstream
from experts.remote.upstream import RemoteRuntime, RemoteSpec
from experts.repository.registry import ExpertRecord
from experts.repository.repo import ExpertRepository
from experts.repository.store import check_expert_id

REMOTE = ExpertKind.REMOTE.value


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in patch.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def _key(value: Any) -> str | None:
    secret = value.get_secret_value().strip() if value is not None else ""
    return secret or None


class RemoteAdminService:
    def __init__(self, repo: ExpertRepository, runtime: RemoteRuntime) -> None:
        self.repo = repo
        self.runtime = runtime
        self._lock = asyncio.Lock()  # one writer of rows + keys at a time

    def describe(self, expert_id: str) -> dict[str, Any]:
        return self.repo.describe(expert_id)

    def _check_fallbacks(self, expert_id: str, spec: RemoteSpec) -> None:
        for fid in spec.fallbacks:
            if fid == expert_id:
                raise InvalidExpertError("an expert cannot be its own fallback")
            if not self.repo.registry.has_expert(fid):
                raise InvalidExpertError(f"fallback {fid!r} is not a registered expert")

    def _check_key_follows(self, expert_id: str, old: RemoteSpec, new: RemoteSpec, rotate: bool,
                           keep_key: bool) -> None:
        """A stored key is sent to a new base_url only when the request says so (`keep_key`), never by default."""
        if keep_key and rotate:
            raise InvalidExpertError("send either api_key (a new key) or keep_key (the stored one), not both")
        if new.base_url != old.base_url and not rotate and not keep_key and self.runtime.secrets.has(expert_id):
            raise InvalidExpertError(
                f"base_url changes from {old.base_url} to {new.base_url}: send the key for the new upstream as "
                "api_key (null for none), or \"keep_key\": true to send the stored key there")

    async def register(self, req: RegisterRemoteRequest) -> dict[str, Any]:
        check_expert_id(req.id)
        if self.repo.registry.has_expert(req.id):
            raise ExpertExistsError(req.id)
        spec = RemoteSpec.from_dict(req.spec_fields())
        self._check_fallbacks(req.id, spec)
        key = _key(req.api_key)
        found = await check_upstream(self.runtime.http, req.id, spec, key) if req.check else None
        record = ExpertRecord(id=req.id, kind=REMOTE, status="ready", tags=list(req.tags), domain=req.domain,
                              spec=spec.to_dict())
        async with self._lock:
            if self.repo.registry.has_expert(req.id):
                raise ExpertExistsError(req.id)
            # Key first, then the row: a crash in between leaves a stray key that start-up removes,
            # never a row whose key is missing.
            if key:
                self.runtime.secrets.set(req.id, key)
            else:
                self.runtime.secrets.delete(req.id)
            try:
                self.repo.insert_record(record)
            except BaseException:
                self.runtime.secrets.delete(req.id)
                raise
            self.runtime.reset(req.id)
        return {**self.describe(req.id), "check": found}

    async def patch(self, expert_id: str, req: PatchExpertRequest) -> dict[str, Any]:
        record = self.repo.record(expert_id)
        if record.kind != REMOTE:
            raise InvalidExpertError(f"expert {expert_id!r} is {record.kind!r}; only remote experts can be patched")
        spec = RemoteSpec.from_dict(_merge(record.spec, req.spec_fields()))
        self._check_fallbacks(expert_id, spec)
        rotate = "api_key" in req.model_fields_set
        old = RemoteSpec.from_dict(record.spec)
        self._check_key_follows(expert_id, old, spec, rotate, req.keep_key)
        key = _key(req.api_key) if rotate else self.runtime.secrets.get(expert_id)
        found = await check_upstream(self.runtime.http, expert_id, spec, key) if req.check else None
        values: dict[str, Any] = {"spec": spec.to_dict()}
        if req.tags is not None:
            values["tags"] = list(req.tags)
        if "domain" in req.model_fields_set:
            values["domain"] = req.domain
        async with self._lock:
            if rotate:
                if key:
                    self.runtime.secrets.set(expert_id, key)
                else:
                    self.runtime.secrets.delete(expert_id)
            self.repo.registry.update_expert(expert_id, **values)
        if rotate or (old.base_url, old.model) != (spec.base_url, spec.model):
            self.runtime.reset(expert_id)  # a new upstream or key starts with a clean slate
        return {**self.describe(expert_id), "check": found}
