"""Registering experts with an artifact: stage, validate, smoke forward, commit to the store, insert the row
(the write order in repo.py's docstring). Mixed into :class:`experts.repository.repo.ExpertRepository`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from experts.base import ExpertKind
from experts.errors import ExpertExistsError, ExpertUnavailableError, InvalidExpertError
from experts.hf.lora import is_adapter_dir, validate_adapter_dir
from experts.hf.smoke import smoke_test_adapter, smoke_test_model
from experts.hf.validation import model_files, validate_model_dir
from experts.repository.registry import ExpertRecord, Registry
from experts.repository.store import ArtifactStore, check_expert_id


class Registration:
    registry: Registry
    store: ArtifactStore
    default_dtype: str | None

    def artifact_dir(self, record: ExpertRecord) -> Path:
        if not record.path:
            raise ExpertUnavailableError(f"expert {record.id!r} has no artifact on disk")
        return self.store.resolve(record.path)

    def stage_copy(self, src: Path) -> Path:
        """Copy a model directory's relevant files into a new staging directory."""
        staging = self.store.new_staging()
        try:
            for f in model_files(src):
                shutil.copy2(f, staging / f.name)
        except OSError:
            self.store.discard(staging)
            raise
        return staging

    def register_staged(self, expert_id: str, staging: Path, *, kind: str = ExpertKind.LOCAL.value,
                        tags: list[str] | None = None, domain: str | None = None,
                        lineage: dict[str, Any] | None = None, spec: dict[str, Any] | None = None) -> ExpertRecord:
        """Validate a staged model directory and register it; on any failure the staging is discarded."""
        try:
            check_expert_id(expert_id)
            if self.registry.has_expert(expert_id):
                raise ExpertExistsError(expert_id)
            info = validate_model_dir(staging)
            smoke_test_model(staging, dtype=self.default_dtype)
            rel = self.store.commit(staging, expert_id)
        except BaseException:
            self.store.discard(staging)
            raise
        record = ExpertRecord(
            id=expert_id, kind=kind, status="ready", architecture=info.architecture, num_params=info.num_params,
            dtype=info.dtype, context_length=info.context_length, tokenizer_fingerprint=info.tokenizer_fingerprint,
            domain=domain, tags=list(tags or []), lineage=lineage, spec=dict(spec or {}), path=rel,
            size_bytes=info.size_bytes,
        )
        try:
            return self.registry.insert_expert(record)
        except BaseException:
            self.store.remove(rel)
            raise

    def register_from_dir(self, expert_id: str, src: Path, *, base: str | None = None, **meta: Any) -> ExpertRecord:
        check_expert_id(expert_id)
        if self.registry.has_expert(expert_id):
            raise ExpertExistsError(expert_id)
        if not src.is_dir():
            raise InvalidExpertError(f"{src} is not a directory on the server")
        if is_adapter_dir(src):
            self.validate_adapter(src, base)  # fail before copying anything
            return self.register_adapter(expert_id, self.stage_copy(src), base=base or "", **meta)
        validate_model_dir(src)
        return self.register_staged(expert_id, self.stage_copy(src), **meta)

    def _lora_base(self, base: str | None) -> ExpertRecord:
        if not base:
            raise InvalidExpertError("this is a LoRA adapter: say which registered expert is its base ('base')")
        record = self.registry.get_expert(base)
        if record.kind != ExpertKind.LOCAL.value:
            raise InvalidExpertError(f"the base of a LoRA adapter must be a local expert; {base!r} is {record.kind}")
        return record

    def validate_adapter(self, src: Path, base: str | None) -> Any:
        return validate_adapter_dir(src, self.artifact_dir(self._lora_base(base)))

    def register_adapter(self, expert_id: str, staging: Path, *, base: str, tags: list[str] | None = None,
                         domain: str | None = None, lineage: dict[str, Any] | None = None,
                         spec: dict[str, Any] | None = None) -> ExpertRecord:
        """Validate a staged LoRA adapter against its base and register it (kind `lora`)."""
        try:
            check_expert_id(expert_id)
            if self.registry.has_expert(expert_id):
                raise ExpertExistsError(expert_id)
            base_rec = self._lora_base(base)
            info = validate_adapter_dir(staging, self.artifact_dir(base_rec))
            smoke_test_adapter(staging, self.artifact_dir(base_rec), dtype=self.default_dtype)
            rel = self.store.commit(staging, expert_id)
        except BaseException:
            self.store.discard(staging)
            raise
        record = ExpertRecord(
            id=expert_id, kind=ExpertKind.LORA.value, status="ready", architecture=base_rec.architecture,
            num_params=info.num_params, dtype=info.dtype, context_length=base_rec.context_length,
            tokenizer_fingerprint=base_rec.tokenizer_fingerprint, domain=domain, tags=list(tags or []),
            lineage=lineage, path=rel, size_bytes=info.size_bytes,
            spec={**(spec or {}), "base": base, "rank": info.rank, "lora_alpha": info.lora_alpha,
                  "target_modules": info.target_modules},
        )
        try:
            return self.registry.insert_expert(record)
        except BaseException:
            self.store.remove(rel)
            raise

    def adopt_orphan(self, name: str, expert_id: str, *, base: str | None = None, **meta: Any) -> ExpertRecord:
        """Register a quarantined artifact (validated, smoke-tested and committed like any registration);
        the orphan is removed only once its expert is registered, so a refusal leaves it in place."""
        src = self.store.orphan_path(name)
        check_expert_id(expert_id)
        if self.registry.has_expert(expert_id):
            raise ExpertExistsError(expert_id)
        if is_adapter_dir(src):
            self.validate_adapter(src, base)
            record = self.register_adapter(expert_id, self.store.link_into_staging(model_files(src)),
                                           base=base or "", **meta)
        else:
            validate_model_dir(src)
            record = self.register_staged(expert_id, self.store.link_into_staging(model_files(src)), **meta)
        self.store.delete_orphan(name)
        return record
