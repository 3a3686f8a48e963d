"""The binding of a registry to its data dir: one id, stored in both, set on the first start.

The registry's rows name artifacts by their path in the data dir, so the two only make sense as a
pair. A database URL that points elsewhere, a recreated `registry.db`, or a registry restored from
another data dir would otherwise make every artifact look like an orphan. The registry id lives in
the registry's `meta` table and in `<data dir>/registry_id`; a mismatched pair refuses to start with
a message saying what to do. Re-binding (`mergegate serve --rebind-registry`, or
`MERGEGATE_REBIND_REGISTRY=1` for one start) accepts the pair as it is and deletes nothing: artifacts
without a row are quarantined in `<data dir>/orphans` like any other orphan.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from experts.errors import RegistryMismatchError
from experts.repository.registry import Registry

log = logging.getLogger("mergegate.repository")

META_KEY = "registry_id"
ID_FILE = "registry_id"
REBIND_HINT = ("start once with `mergegate serve --rebind-registry` (or MERGEGATE_REBIND_REGISTRY=1) to bind this "
               "database to this data dir as they are: nothing is deleted, artifacts without a registry row are "
               "moved to <data dir>/orphans, from where POST /admin/orphans/{name}/adopt registers them again")


@dataclass(frozen=True)
class Binding:
    """What the registry and the data dir say (read-only)."""

    registry_id: str | None  # in the database's meta table
    data_dir_id: str | None  # in <data dir>/registry_id
    registry_rows: int  # experts + jobs in the database
    artifacts: int  # directories under <data dir>/experts

    @property
    def matched(self) -> bool:
        return self.registry_id is not None and self.registry_id == self.data_dir_id

    @property
    def fresh(self) -> bool:
        """Neither side is bound yet (a first start, or a data dir from before binding existed)."""
        return self.registry_id is None and self.data_dir_id is None


def safe_url(url: str) -> str:
    """The database URL without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("://")[0] + "://..."


def inspect_binding(registry: Registry, data_dir: Path) -> Binding:
    """Read both sides without writing anything (a new database stays empty)."""
    path = data_dir / ID_FILE
    dir_id = (path.read_text().strip() or None) if path.is_file() else None
    experts = data_dir / "experts"
    n_artifacts = sum(1 for p in experts.iterdir() if p.is_dir()) if experts.is_dir() else 0
    return Binding(registry.read_meta(META_KEY), dir_id, registry.count_rows(), n_artifacts)


def mismatch(binding: Binding, registry: Registry, data_dir: Path) -> str | None:
    """Why this registry and this data dir are not a pair (None: they are, or neither is bound yet and
    nothing says otherwise)."""
    db, d = safe_url(registry.url), str(data_dir)
    b = binding
    if b.matched or (b.registry_rows == 0 and b.artifacts == 0):
        return None  # a pair, or nothing at stake (a first start, even one cut short between the two writes)
    if b.fresh:
        if b.registry_rows == 0 and b.artifacts > 0:
            return (f"the registry at {db} is empty, but the data dir {d} holds {b.artifacts} expert artifact(s): "
                    "is MERGEGATE_DATABASE_URL pointing at the wrong database? Point it at this data dir's registry, "
                    f"or {REBIND_HINT}")
        return None
    if b.registry_id is None:
        return (f"the data dir {d} belongs to registry {b.data_dir_id}, but the database at {db} has no registry id "
                "(a new or recreated database, or a mistyped MERGEGATE_DATABASE_URL). Point MERGEGATE_DATABASE_URL "
                f"at this data dir's registry or restore it; or {REBIND_HINT}")
    if b.data_dir_id is None:
        return (f"the database at {db} is registry {b.registry_id}, bound to another data dir, and the data dir "
                f"{d} has no {ID_FILE} file. Use the data dir this registry belongs to (--data-dir); or {REBIND_HINT}")
    return (f"the database at {db} is registry {b.registry_id}, but the data dir {d} belongs to registry "
            f"{b.data_dir_id} (a registry restored from another data dir, or another database URL). Use the matching "
            f"pair; or {REBIND_HINT}")


def check_binding(registry: Registry, data_dir: Path, *, rebind: bool = False) -> None:
    """Raise RegistryMismatchError unless the pair may be opened (read-only: for a pre-flight check)."""
    if rebind:
        return
    reason = mismatch(inspect_binding(registry, data_dir), registry, data_dir)
    if reason is not None:
        raise RegistryMismatchError(reason)


def bind(registry: Registry, data_dir: Path, *, rebind: bool = False) -> str:
    """Check the pair and, on a first start or a re-bind, write the id to both sides; returns the id.
    Needs the migrated schema (the meta table)."""
    b = inspect_binding(registry, data_dir)
    if b.matched:
        assert b.registry_id is not None
        return b.registry_id
    reason = mismatch(b, registry, data_dir)
    if reason is not None and not rebind:
        raise RegistryMismatchError(reason)
    ident = b.registry_id or b.data_dir_id or f"reg-{uuid.uuid4().hex}"
    if reason is not None:
        log.warning("re-binding the registry at %s to the data dir %s as registry %s (%s)", safe_url(registry.url),
                    data_dir, ident, reason.split(".")[0])
        registry.write_meta(META_KEY, ident)
    else:  # a first start: replicas starting together on one database agree on the id the database took first
        ident = registry.claim_meta(META_KEY, ident)
    _write_id_file(data_dir / ID_FILE, ident)
    return ident


def _write_id_file(path: Path, ident: str) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # replicas may write it at once
    with tmp.open("w") as f:
        f.write(ident + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
