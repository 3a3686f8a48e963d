"""ExpertRepository: the registry rows, the artifacts on disk and the loaded models, kept consistent.

Kinds plug in through a table of :class:`Kind` (see :mod:`experts.runtime`): the repository itself
knows no kind but how to store and validate local models and LoRA adapters.

Writes follow one order so that a crash at any point leaves a consistent repository:
stage the artifact -> validate -> smoke forward (finite logits) -> rename into the store -> insert
the registry row. A row is only ever inserted for a complete artifact. An artifact without a row
(a crash between rename and insert, or a registry that lost rows) is never deleted: at start-up it
is moved to `<data dir>/orphans`, to be adopted again or deleted by an admin. The registry is bound to
its data dir (`binding.py`): a mismatched pair refuses to open. Deletion removes the row first,
then the artifact.

Replicas (`replicas.py`) may share the registry and the data dir: every request reads its row from the
registry, so a registration on one replica is served by all; a model cached here is dropped when its row
names another artifact or spec than the one loaded (deleted and registered again elsewhere), on the next
request for it or at the next `sync()`, and when its row is gone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from experts.base import Expert
from experts.errors import (
    ExpertBuildingError,
    ExpertInUseError,
    ExpertNotFoundError,
    ExpertUnavailableError,
)
from experts.hf.loading import LoadedModel, ModelCache
from experts.hf.multilora import AdapterCache
from experts.repository.binding import bind, check_binding
from experts.repository.building import BuildingSet
from experts.repository.registration import Registration
from experts.repository.registry import ExpertRecord, Registry
from experts.repository.replicas import Replica
from experts.repository.store import ORPHAN_GRACE_S, ArtifactStore, check_expert_id

log = logging.getLogger("mergegate.repository")
# A request may be served from a registry row read this long ago: a change made by this process shows at
# once, one made by another replica within this time (a query per request cost the event loop ~1.5 ms).
SERVE_ROW_MAX_AGE_S = 1.0



def _none(record: ExpertRecord) -> list[str]:
    return []


def _stamp(record: ExpertRecord) -> str:
    """What a loaded copy of an expert depends on: its artifact (a new registration gets a new path) and spec."""
    return f"{record.path}|{json.dumps(record.spec, sort_keys=True, default=str)}"


@dataclass(frozen=True)
class Kind:
    """How the repository handles one kind of expert.

    `record_kind` is the registry's `kind` column; `when` narrows it (black-box ensembles and BTM forests
    are both `ensemble` rows). `serve` builds the servable object for a ready record; `load` reads its
    weights into the model cache (None: nothing to load); `describe` adds kind-specific fields to
    `describe()`; `forget` cleans up after a delete; `on_open` runs once at start-up with the kind's
    records; `uses` names the experts this one depends on (they cannot be deleted while it exists), in the
    role `uses_as` says (for the message that refuses such a delete)."""

    name: str
    record_kind: str
    serve: Callable[[ExpertRecord, ExpertRepository], Expert]
    load: Callable[[ExpertRecord, ExpertRepository], LoadedModel] | None = None
    when: Callable[[ExpertRecord], bool] | None = None
    describe: Callable[[ExpertRecord, ExpertRepository], dict[str, Any]] | None = None
    forget: Callable[[ExpertRecord, ExpertRepository], None] | None = None
    on_open: Callable[[list[ExpertRecord], ExpertRepository], None] | None = None
    uses: Callable[[ExpertRecord], list[str]] = _none
    resident: Callable[[ExpertRecord], str] | None = None  # the cache entry that serving it keeps loaded
    uses_as: str = "a dependency"


class ExpertRepository(Registration):
    def __init__(self, registry: Registry, store: ArtifactStore, *, kinds: Sequence[Kind], runtime: Any,
                 max_loaded_models: int, max_loaded_bytes: int, default_dtype: str | None = None,
                 owns_runtime: bool = False, max_adapter_bytes: int = 1 << 30,
                 virtual: Callable[[str, ExpertRepository], Expert | None] | None = None,
                 replica: Replica | None = None) -> None:
        self.registry = registry
        self.replica = replica  # this process among the replicas sharing the registry and the data dir
        self.store = store
        self.kinds = tuple(kinds)
        self.runtime = runtime  # experts.runtime.Runtime: the torch thread and the remote experts' client
        self._owns_runtime = owns_runtime
        self.default_dtype = default_dtype
        self.cache = ModelCache(self._load, max_models=max_loaded_models, max_bytes=max_loaded_bytes)
        self.adapters = AdapterCache(max_adapter_bytes)  # LoRA factors served on resident bases
        self._virtual = virtual  # model ids that name no row (request-time mixes)
        self.building = BuildingSet()  # ids a running job will register (503 until then, not 404)
        self._stamps: dict[str, str] = {}  # expert id -> _stamp of the row it was last served from

    def kind_of(self, record: ExpertRecord) -> Kind:
        for kind in self.kinds:
            if kind.record_kind == record.kind and (kind.when is None or kind.when(record)):
                return kind
        raise ExpertUnavailableError(
            f"expert {record.id!r} is of kind {record.kind!r}, which this gateway cannot serve")

    # -- life cycle ---------------------------------------------------------------------------
    def open(self, *, rebind: bool = False) -> None:
        """Check that the registry belongs to this data dir (RegistryMismatchError if not, before anything
        is written), migrate the schema, clear staging debris, quarantine orphans, re-apply pins."""
        check_binding(self.registry, self.store.root, rebind=rebind)
        self.registry.migrate()
        bind(self.registry, self.store.root, rebind=rebind)
        replica = self.replica
        self.store.cleanup(replica.is_dead if replica is not None else None)
        records = self.registry.list_experts()
        grace = ORPHAN_GRACE_S if replica is not None and replica.others_alive() else 0.0
        for orphan in self.store.orphans({r.path for r in records if r.path}, grace_s=grace):
            dest = self.store.quarantine(orphan)
            log.warning("artifact %s has no registry row: moved to %s (GET /admin/orphans lists it; adopt it with "
                        "POST /admin/orphans/%s/adopt or delete it with DELETE /admin/orphans/%s)",
                        orphan.name, dest, dest.name, dest.name)
        records = self._check_artifacts(records)
        for kind in self.kinds:
            if kind.on_open is not None:
                kind.on_open([r for r in records if self._matches(kind, r)], self)
        for r in records:
            if r.pinned:  # pinned means resident: load now, so the first request is not a cold start
                key = self._resident(r)
                self.cache.pin(key)
                try:
                    self.cache.get(key)
                except Exception as e:
                    log.warning("pinned expert %s failed to load: %s", r.id, e)

    def _check_artifacts(self, records: list[ExpertRecord]) -> list[ExpertRecord]:
        """A row whose artifact is gone (a registry newer than its data dir) is marked `missing`, and ready
        again once the artifact is back; nothing else is touched."""
        out = []
        for r in records:
            if r.path and r.status in ("ready", "missing"):
                status = "ready" if self.store.resolve(r.path).is_dir() else "missing"
                if status != r.status:
                    log.warning("expert %s: artifact %s %s", r.id, r.path,
                                "is missing" if status == "missing" else "is back")
                    r = self.registry.update_expert(r.id, status=status)
            out.append(r)
        return out

    # -- queries ------------------------------------------------------------------------------
    def record(self, expert_id: str) -> ExpertRecord:
        return self.registry.get_expert(expert_id)

    def list(self, *, kind: str | None = None) -> list[ExpertRecord]:
        return self.registry.list_experts(kind=kind)

    def get(self, expert_id: str) -> Expert:
        if self._virtual is not None:
            served = self._virtual(expert_id, self)
            if served is not None:
                return served
        record = self._row(expert_id, max_age_s=SERVE_ROW_MAX_AGE_S)
        self._check_stamp(record)
        if record.status != "ready":
            raise ExpertUnavailableError(f"expert {expert_id!r} is {record.status}, not ready")
        return self.kind_of(record).serve(record, self)

    def _check_stamp(self, record: ExpertRecord) -> None:
        stamp, seen = _stamp(record), self._stamps.get(record.id)
        if seen is not None and seen != stamp:
            log.info("expert %s changed in the registry (another replica): dropping its loaded copy", record.id)
            self._drop(record.id)
        self._stamps[record.id] = stamp

    def _drop(self, expert_id: str) -> None:
        self.cache.forget(expert_id)
        self.adapters.forget(expert_id)
        self._stamps.pop(expert_id, None)

    def sync(self) -> int:
        """Drop what is cached for experts deleted or changed in the registry since (by another replica), and
        the staging debris of dead replicas; returns how many cached experts went. Called by the heartbeat."""
        if self.replica is not None:
            self.store.cleanup(self.replica.is_dead, legacy=False)
        current = {r.id: _stamp(r) for r in self.registry.list_experts()}
        stale = [i for i, s in list(self._stamps.items()) if current.get(i) != s]
        for expert_id in stale:
            self._drop(expert_id)
            self.registry.forget_recent(expert_id)  # the next request reads the new row, not a recent copy
        return len(stale)

    @staticmethod
    def _matches(kind: Kind, record: ExpertRecord) -> bool:
        return kind.record_kind == record.kind and (kind.when is None or kind.when(record))

    def _row(self, expert_id: str, max_age_s: float = 0.0) -> ExpertRecord:
        """The registry row; for an id a running job will register, ExpertBuildingError (503) instead of 404."""
        try:
            return self.registry.get_expert(expert_id, max_age_s=max_age_s)
        except ExpertNotFoundError:
            planned = self.building.get(expert_id)
            if planned is None or self.registry.has_expert(expert_id):
                raise
            raise ExpertBuildingError(expert_id, planned.job_id, planned.what) from None

    def describe(self, expert_id: str) -> dict[str, Any]:
        record = self._row(expert_id)
        d = record.to_dict()
        d["loaded"] = self.is_loaded(expert_id)
        kind = self.kind_of(record)
        if kind.describe is not None:
            d.update(kind.describe(record, self))
        return d

    # -- loading ------------------------------------------------------------------------------
    def _load(self, expert_id: str) -> LoadedModel:
        record = self.registry.get_expert(expert_id)
        self._stamps[record.id] = _stamp(record)
        load = self.kind_of(record).load
        if load is None:
            raise ExpertUnavailableError(f"experts of kind {record.kind!r} have no weights to load")
        try:
            return load(record, self)
        except ExpertUnavailableError:
            raise
        except Exception as e:
            raise ExpertUnavailableError(f"expert {expert_id!r} failed to load: {e}") from e

    def _resident(self, record: ExpertRecord) -> str:
        """The model-cache entry that serving `record` keeps loaded (a LoRA adapter: its base)."""
        try:
            kind = self.kind_of(record)
        except ExpertUnavailableError:
            return record.id
        return kind.resident(record) if kind.resident is not None else record.id

    def is_loaded(self, expert_id: str) -> bool:
        try:
            return self.cache.is_loaded(self._resident(self.registry.get_expert(expert_id)))
        except Exception:
            return False

    def load(self, expert_id: str) -> None:
        expert = self.get(expert_id)  # checks it exists and is servable
        self.cache.get(self._resident(self.record(expert_id)))
        adapter = getattr(expert, "adapter", None)
        if adapter is not None:
            adapter()  # LoRA factors into the adapter cache

    def unload(self, expert_id: str) -> bool:
        record = self.registry.get_expert(expert_id)
        self.adapters.forget(expert_id)
        key = self._resident(record)
        return self.cache.unload(key) if key == expert_id else False

    def pin(self, expert_id: str, pinned: bool = True) -> ExpertRecord:
        record = self.registry.update_expert(expert_id, pinned=pinned)
        key = self._resident(record)
        self.cache.pin(key, pinned)
        if pinned:
            self.load(expert_id)
        return record

    def insert_record(self, record: ExpertRecord) -> ExpertRecord:
        """Register an expert without an artifact (remote and ensemble kinds)."""
        check_expert_id(record.id)
        return self.registry.insert_expert(record)

    # -- removal ------------------------------------------------------------------------------
    def dependents(self, expert_id: str) -> list[tuple[str, str]]:
        """Experts that use this one, each with how (a LoRA's base, a forest's or ensemble's member, a remote
        expert's fallback)."""
        out = []
        for r in self.registry.list_experts():
            try:
                kind = self.kind_of(r)
            except ExpertUnavailableError:
                continue
            if expert_id in kind.uses(r):
                out.append((r.id, f"{kind.name} expert, as {kind.uses_as}"))
        return out

    def delete(self, expert_id: str) -> None:
        record = self.registry.get_expert(expert_id)
        users = self.dependents(expert_id)
        if users:
            named = ", ".join(f"{i!r} ({how})" for i, how in users)
            raise ExpertInUseError(f"expert {expert_id!r} is used by {named}: delete those first, or remove the "
                                   "reference")
        self.registry.delete_expert(expert_id)
        self._drop(expert_id)
        self.store.remove(record.path)
        kind = self.kind_of(record)
        if kind.forget is not None:
            kind.forget(record, self)

    def close(self) -> None:
        self.registry.close()
        if self.replica is not None:
            self.replica.release()
        if self._owns_runtime:
            self.runtime.close()
