"""ExpertRepository: the registry rows, the artifacts on disk and the loaded models, kept consistent.

Writes follow one order so that a crash at any point leaves a consistent repository:
stage the artifact -> validate -> rename into the store -> insert the registry row. A row is only
ever inserted for a complete artifact; an artifact without a row is an orphan removed at start-up.
Deletion removes the row first, then the artifact.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experts.base import Expert, ExpertKind
from experts.errors import ExpertExistsError, ExpertInUseError, ExpertUnavailableError, InvalidExpertError
from experts.hf.loading import LoadedModel, ModelCache, load_hf_model
from experts.hf.local import LocalExpert
from experts.hf.lora import is_adapter_dir, load_lora_model, validate_adapter_dir
from experts.repository.registry import ExpertRecord, Registry
from experts.repository.store import ArtifactStore, check_expert_id
from experts.hf.validation import model_files, validate_model_dir

log = logging.getLogger("mergegate.repository")

ExpertFactory = Callable[[ExpertRecord], Expert]
ModelLoader = Callable[[ExpertRecord], LoadedModel]


class ExpertRepository:
    def __init__(self, registry: Registry, store: ArtifactStore, *, max_loaded_models: int, max_loaded_bytes: int,
                 default_dtype: str | None = None) -> None:
        self.registry = registry
        self.store = store
        self.default_dtype = default_dtype
        self.cache = ModelCache(self._load, max_models=max_loaded_models, max_bytes=max_loaded_bytes)
        # Kinds plug in here: how to serve a record, and how to load its weights.
        local = lambda r: LocalExpert(r, self.cache)  # noqa: E731
        self.factories: dict[str, ExpertFactory] = {ExpertKind.LOCAL.value: local, ExpertKind.LORA.value: local}
        self.factories[ExpertKind.ENSEMBLE.value] = local
        self.loaders: dict[str, ModelLoader] = {ExpertKind.LOCAL.value: self._load_local,
                                                ExpertKind.LORA.value: self._load_lora,
                                                ExpertKind.ENSEMBLE.value: self._load_ensemble}
        # Kind-specific extras for describe() (e.g. a remote expert's breaker), and clean-ups after delete().
        self.describers: dict[str, Callable[[ExpertRecord], dict[str, Any]]] = {}
        self.on_delete: list[Callable[[ExpertRecord], None]] = []

    # -- life cycle ---------------------------------------------------------------------------
    def open(self) -> None:
        """Migrate the schema, clear crash debris, and re-apply pins."""
        self.registry.migrate()
        self.store.cleanup()
        records = self.registry.list_experts()
        for orphan in self.store.orphans({r.path for r in records if r.path}):
            shutil.rmtree(orphan, ignore_errors=True)
        for r in records:
            if r.pinned:  # pinned means resident: load now, so the first request is not a cold start
                self.cache.pin(r.id)
                try:
                    self.cache.get(r.id)
                except Exception as e:  # noqa: BLE001 - a broken expert must not stop the gateway
                    log.warning("pinned expert %s failed to load: %s", r.id, e)

    # -- queries ------------------------------------------------------------------------------
    def record(self, expert_id: str) -> ExpertRecord:
        return self.registry.get_expert(expert_id)

    def list(self, *, kind: str | None = None) -> list[ExpertRecord]:
        return self.registry.list_experts(kind=kind)

    def get(self, expert_id: str) -> Expert:
        record = self.registry.get_expert(expert_id)
        if record.status != "ready":
            raise ExpertUnavailableError(f"expert {expert_id!r} is {record.status}, not ready")
        factory = self.factories.get(record.kind)
        if factory is None:
            raise ExpertUnavailableError(f"expert {expert_id!r} is of kind {record.kind!r}, which this gateway cannot serve")
        return factory(record)

    def describe(self, expert_id: str) -> dict[str, Any]:
        record = self.registry.get_expert(expert_id)
        d = record.to_dict()
        d["loaded"] = self.cache.is_loaded(expert_id)
        describer = self.describers.get(record.kind)
        if describer is not None:
            d.update(describer(record))
        return d

    def artifact_dir(self, record: ExpertRecord) -> Path:
        if not record.path:
            raise ExpertUnavailableError(f"expert {record.id!r} has no artifact on disk")
        return self.store.resolve(record.path)

    # -- loading ------------------------------------------------------------------------------
    def _load(self, expert_id: str) -> LoadedModel:
        record = self.registry.get_expert(expert_id)
        loader = self.loaders.get(record.kind)
        if loader is None:
            raise ExpertUnavailableError(f"experts of kind {record.kind!r} have no weights to load")
        try:
            return loader(record)
        except ExpertUnavailableError:
            raise
        except Exception as e:
            raise ExpertUnavailableError(f"expert {expert_id!r} failed to load: {e}") from e

    def _load_local(self, record: ExpertRecord) -> LoadedModel:
        return load_hf_model(self.artifact_dir(record), dtype=self.default_dtype)

    def _load_lora(self, record: ExpertRecord) -> LoadedModel:
        base = self.registry.get_expert(record.spec["base"])
        return load_lora_model(self.artifact_dir(record), self.artifact_dir(base), dtype=self.default_dtype)

    def _load_ensemble(self, record: ExpertRecord) -> LoadedModel:
        from experts.btm.forest import load_forest

        return load_forest(self, record)

    def load(self, expert_id: str) -> None:
        self.get(expert_id)  # checks it exists and is servable
        self.cache.get(expert_id)

    def unload(self, expert_id: str) -> bool:
        self.registry.get_expert(expert_id)
        return self.cache.unload(expert_id)

    def pin(self, expert_id: str, pinned: bool = True) -> ExpertRecord:
        record = self.registry.update_expert(expert_id, pinned=pinned)
        self.cache.pin(expert_id, pinned)
        if pinned:
            self.cache.get(expert_id)
        return record

    # -- registration -------------------------------------------------------------------------
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

    def insert_record(self, record: ExpertRecord) -> ExpertRecord:
        """Register an expert without an artifact (remote and ensemble kinds)."""
        check_expert_id(record.id)
        return self.registry.insert_expert(record)

    # -- removal ------------------------------------------------------------------------------
    def dependents(self, expert_id: str) -> list[str]:
        out = []
        for r in self.registry.list_experts():
            members = [m.get("id") for m in r.spec.get("members", []) if isinstance(m, dict)]
            if r.spec.get("base") == expert_id or expert_id in members:
                out.append(r.id)
        return out

    def delete(self, expert_id: str) -> None:
        record = self.registry.get_expert(expert_id)
        users = self.dependents(expert_id)
        if users:
            raise ExpertInUseError(f"expert {expert_id!r} is used by {users}; delete those first")
        self.registry.delete_expert(expert_id)
        self.cache.forget(expert_id)
        self.store.remove(record.path)
        for hook in self.on_delete:
            hook(record)

    def close(self) -> None:
        self.registry.close()
