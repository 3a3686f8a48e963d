"""The assembly of the domain: the run-time resources, the table of expert kinds, `open_repository`.

Every entry point (the app's lifespan, the CLI, the demo, the benches, the tests) opens its
repository here, so each of them can serve every kind of expert. `KINDS` is the one place that
says, for each kind, how a registry record is served, how its weights load, what `describe`
adds, what to clean up when it is deleted and which other experts it depends on.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import httpx

from experts.base import Expert, ExpertKind
from experts.blackbox.ensemble import BlackBoxEnsemble
from experts.blackbox.spec import is_blackbox
from experts.btm.forest import load_forest
from experts.errors import ExpertUnavailableError
from experts.hf.engine.batch import Limits
from experts.hf.engine.engine import Engine, Observer
from experts.hf.loading import LoadedModel, load_hf_model
from experts.hf.local import AdapterExpert, LocalExpert
from experts.hf.lora import load_lora_model
from experts.hf.multilora import read_adapter
from experts.remote.expert import RemoteExpert
from experts.remote.secrets import SecretStore
from experts.remote.upstream import RemoteRuntime, RemoteSpec
from experts.repository.mixes import is_mix_id, mix_factors, mix_record
from experts.repository.registry import ExpertRecord, Registry
from experts.repository.replicas import Replica
from experts.repository.repo import ExpertRepository, Kind
from experts.repository.store import ArtifactStore

T = TypeVar("T")


class TorchExecutor:
    """`submit(fn, *args)` on the engine thread, for code written against an executor."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def submit(self, fn: Callable[..., T], *args: Any) -> Future:
        return self._engine.call(fn, *args)


class Runtime:
    """What serving needs while the process runs: the engine (the one thread every forward pass runs
    on, batching the requests of each model), and the pooled HTTP client, key store and upstream
    health of remote experts. Without an HTTP client (a CLI command, a bench) remote experts cannot
    be served."""

    def __init__(self, *, limits: Limits | None = None, observer: Observer | None = None,
                 http: httpx.AsyncClient | None = None, secrets_dir: Path | None = None,
                 engine_threads: int | None = None) -> None:
        self.engine = Engine(limits, observer=observer, threads=engine_threads)
        self.torch = TorchExecutor(self.engine)
        self.remote: RemoteRuntime | None = None
        if http is not None:
            if secrets_dir is None:
                raise ValueError("remote experts need a secrets directory")
            self.remote = RemoteRuntime(http, SecretStore(secrets_dir))

    async def run_torch(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking torch work on the engine thread (between batch steps), off the event loop."""
        return await self.engine.run(fn, *args)

    def require_remote(self, expert_id: str) -> RemoteRuntime:
        if self.remote is None:
            raise ExpertUnavailableError(f"expert {expert_id!r} is remote; this process has no HTTP client to reach it")
        return self.remote

    def close(self) -> None:
        self.engine.close()


# -- the kinds ------------------------------------------------------------------------------------------

def _serve_local(record: ExpertRecord, repo: ExpertRepository) -> Expert:
    return LocalExpert(record, repo.cache, repo.runtime.engine)


def _load_local(record: ExpertRecord, repo: ExpertRepository) -> LoadedModel:
    return load_hf_model(repo.artifact_dir(record), dtype=repo.default_dtype)


def _serve_lora(record: ExpertRecord, repo: ExpertRepository) -> Expert:
    """Served on the base's resident model with per-row LoRA deltas (experts.hf.multilora)."""
    return AdapterExpert(record, repo.cache, repo.runtime.engine, base=str(record.spec["base"]),
                         factors=lambda: repo.adapters.get(
                             record.id, lambda: read_adapter(record.id, repo.artifact_dir(record))))


def _serve_mix(model_id: str, repo: ExpertRepository) -> Expert | None:
    """A request-time mix of LoRA adapters (experts.repository.mixes), or None for an ordinary id."""
    if not is_mix_id(model_id):
        return None
    record = mix_record(repo, model_id)
    return AdapterExpert(record, repo.cache, repo.runtime.engine, base=str(record.spec["base"]),
                         factors=lambda: repo.adapters.get(model_id, lambda: mix_factors(repo, model_id)))


def _lora_resident(record: ExpertRecord) -> str:
    return str(record.spec["base"])


def _load_lora(record: ExpertRecord, repo: ExpertRepository) -> LoadedModel:
    """The adapter merged into a full copy of its base: for what needs a model of its own (a forest member,
    a merge's source), not for serving."""
    base = repo.record(record.spec["base"])
    return load_lora_model(repo.artifact_dir(record), repo.artifact_dir(base), dtype=repo.default_dtype)


def _load_forest(record: ExpertRecord, repo: ExpertRepository) -> LoadedModel:
    return load_forest(repo, record)


def _serve_blackbox(record: ExpertRecord, repo: ExpertRepository) -> Expert:
    return BlackBoxEnsemble(record, repo.get, repo.runtime.run_torch)


def _no_weights(record: ExpertRecord, repo: ExpertRepository) -> LoadedModel:
    raise ExpertUnavailableError(f"{record.id!r} is a black-box ensemble: it has no weights of its own "
                                 "(its local members load on first use)")


def _serve_remote(record: ExpertRecord, repo: ExpertRepository) -> Expert:
    return RemoteExpert(record, repo.runtime.require_remote(record.id))


def _describe_remote(record: ExpertRecord, repo: ExpertRepository) -> dict[str, Any]:
    if repo.runtime.remote is None:
        return {}
    return {"remote": RemoteExpert(record, repo.runtime.remote).status()}


def _forget_remote(record: ExpertRecord, repo: ExpertRepository) -> None:
    if repo.runtime.remote is not None:
        repo.runtime.remote.forget(record.id)


def _open_remote(records: list[ExpertRecord], repo: ExpertRepository) -> None:
    if repo.runtime.remote is not None:  # keys of experts that no longer exist (a crash between key and row)
        repo.runtime.remote.cleanup({r.id for r in records})


def _members(record: ExpertRecord) -> list[str]:
    return [str(m["id"]) for m in record.spec.get("members", []) if isinstance(m, dict) and "id" in m]


def _lora_base(record: ExpertRecord) -> list[str]:
    return [str(record.spec["base"])] if record.spec.get("base") else []


def _fallbacks(record: ExpertRecord) -> list[str]:
    return list(RemoteSpec.from_dict(record.spec).fallbacks)


LOCAL, LORA, ENSEMBLE, REMOTE = (k.value for k in (ExpertKind.LOCAL, ExpertKind.LORA, ExpertKind.ENSEMBLE,
                                                    ExpertKind.REMOTE))

#: Every kind of expert this gateway serves. The first entry whose registry kind (and `when`) matches a
#: record handles it: black-box ensembles and BTM forests share the registry kind `ensemble`.
KINDS: tuple[Kind, ...] = (
    Kind("local", LOCAL, serve=_serve_local, load=_load_local),
    Kind("lora", LORA, serve=_serve_lora, load=_load_lora, uses=_lora_base, uses_as="its base",
         resident=_lora_resident),
    Kind("blackbox", ENSEMBLE, when=is_blackbox, serve=_serve_blackbox, load=_no_weights, uses=_members,
         uses_as="a member"),
    Kind("forest", ENSEMBLE, serve=_serve_local, load=_load_forest, uses=_members, uses_as="a member"),
    Kind("remote", REMOTE, serve=_serve_remote, describe=_describe_remote, forget=_forget_remote,
         on_open=_open_remote, uses=_fallbacks, uses_as="a fallback"),
)


def open_repository(data_dir: Path, *, database_url: str | None = None, runtime: Runtime | None = None,
                    max_loaded_models: int = 16, max_loaded_bytes: int = 8 << 30,
                    default_dtype: str | None = None, rebind: bool = False,
                    max_adapter_bytes: int = 1 << 30) -> ExpertRepository:
    """Open (check the registry's binding to the data dir, migrate, clean, quarantine orphans, re-pin) the
    repository under `data_dir` with every kind of expert.

    `database_url` defaults to SQLite at `<data_dir>/registry.db`; `runtime` to one torch thread and
    no HTTP client; `rebind` binds a mismatched registry to this data dir instead of refusing
    (RegistryMismatchError). The caller closes the repository (and the runtime it passed in)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    url = database_url or f"sqlite:///{(data_dir / 'registry.db').resolve()}"
    replica = Replica(data_dir).acquire()  # this process among those sharing the data dir (released by close)
    repo = ExpertRepository(Registry(url), ArtifactStore(data_dir, replica_id=replica.id), kinds=KINDS,
                            runtime=runtime or Runtime(), max_loaded_models=max_loaded_models,
                            max_loaded_bytes=max_loaded_bytes, default_dtype=default_dtype,
                            owns_runtime=runtime is None, max_adapter_bytes=max_adapter_bytes, virtual=_serve_mix,
                            replica=replica)
    try:
        repo.open(rebind=rebind)
    except BaseException:
        repo.close()
        raise
    return repo
