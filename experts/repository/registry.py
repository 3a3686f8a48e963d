"""The registry: experts and jobs in a SQL database (SQLite by default, any SQLAlchemy URL works).

Portable SQL through SQLAlchemy Core so that several gateways can share one PostgreSQL. The schema
is versioned: `MIGRATIONS[i]` moves the database from version i to i + 1, inside one transaction.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from experts.errors import ExpertExistsError, ExpertNotFoundError, JobNotFoundError

metadata = sa.MetaData()

schema_info = sa.Table(
    "schema_info", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
)

experts_table = sa.Table(
    "experts", metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("architecture", sa.String(128)),
    sa.Column("num_params", sa.BigInteger),
    sa.Column("dtype", sa.String(16)),
    sa.Column("context_length", sa.Integer),
    sa.Column("tokenizer_fingerprint", sa.String(64)),
    sa.Column("domain", sa.String(128)),
    sa.Column("tags", sa.JSON, nullable=False),
    sa.Column("lineage", sa.JSON),  # {"parents": [{"id", "weight"}], "recipe": {...}}
    sa.Column("spec", sa.JSON, nullable=False),  # kind-specific settings (base id, upstream, members...)
    sa.Column("path", sa.String(512)),  # artifact directory, relative to the data dir
    sa.Column("size_bytes", sa.BigInteger),
    sa.Column("pinned", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

jobs_table = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("progress", sa.Float, nullable=False, default=0.0),
    sa.Column("message", sa.Text),
    sa.Column("result", sa.JSON),
    sa.Column("error", sa.Text),
    sa.Column("owner", sa.String(64)),  # the gateway instance that runs it
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("detail", sa.JSON),  # live, kind-specific progress (a search's best so far, its loss series)
    sa.Column("lease_until", sa.Float),  # the owner's heartbeat renews it; past it, another replica fails the job
)


meta_table = sa.Table(
    "meta", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


def _v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[experts_table, jobs_table])


def _v2(conn: Connection) -> None:
    """jobs.detail (a v1 database created by an older gateway lacks it; a new one has it from _v1)."""
    if "detail" not in {c["name"] for c in sa.inspect(conn).get_columns("jobs")}:
        conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN detail JSON"))


def _v3(conn: Connection) -> None:
    """meta: key/value facts about the registry itself (its `registry_id`, bound to one data dir)."""
    metadata.create_all(conn, tables=[meta_table])


def _v4(conn: Connection) -> None:
    """jobs.lease_until: replicas sharing one database fail a job whose owner stopped renewing its lease."""
    if "lease_until" not in {c["name"] for c in sa.inspect(conn).get_columns("jobs")}:
        conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN lease_until FLOAT"))


MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2, _v3, _v4]
MIGRATION_LOCK = 0x4D475F4D  # a PostgreSQL advisory lock: replicas starting together migrate one at a time
SCHEMA_VERSION = len(MIGRATIONS)
RECENT_ROWS = 4096  # rows kept for get_expert(max_age_s=...); beyond it, the copies are dropped


@dataclass
class ExpertRecord:
    id: str
    kind: str
    status: str = "ready"
    architecture: str | None = None
    num_params: int | None = None
    dtype: str | None = None
    context_length: int | None = None
    tokenizer_fingerprint: str | None = None
    domain: str | None = None
    tags: list[str] = field(default_factory=list)
    lineage: dict[str, Any] | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    size_bytes: int | None = None
    pinned: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JobRecord:
    id: str
    kind: str
    params: dict[str, Any]
    status: str
    progress: float = 0.0
    message: str | None = None
    result: Any = None
    error: str | None = None
    owner: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float = 0.0
    detail: dict[str, Any] | None = None
    lease_until: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(url, pool_pre_ping=True)


class Registry:
    """Row-level access to experts and jobs. Thread-safe: every call uses its own connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        # id -> (when read, the row pickled): each hit unpickles its own copy, 4x cheaper than a deepcopy of a
        # forest's spec, which the serving path pays per request
        self._recent: dict[str, tuple[float, bytes]] = {}

    # -- schema -------------------------------------------------------------------------------
    def migrate(self) -> int:
        """Bring the schema to SCHEMA_VERSION; returns the version found before."""
        with self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
            metadata.create_all(conn, tables=[schema_info])
            row = conn.execute(sa.select(schema_info.c.version).where(schema_info.c.id == 1)).first()
            found = row[0] if row else 0
            if found > SCHEMA_VERSION:
                raise RuntimeError(f"database schema v{found} is newer than this gateway (v{SCHEMA_VERSION})")
            for version in range(found, SCHEMA_VERSION):
                MIGRATIONS[version](conn)
            if row is None:
                conn.execute(sa.insert(schema_info).values(id=1, version=SCHEMA_VERSION))
            else:
                conn.execute(sa.update(schema_info).where(schema_info.c.id == 1).values(version=SCHEMA_VERSION))
        return found

    def read_meta(self, key: str) -> str | None:
        """A value of the meta table; None when absent, or when the database has no meta table yet
        (a new database, or one not migrated): reading never creates anything."""
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table(meta_table.name):
                return None
            row = conn.execute(sa.select(meta_table.c.value).where(meta_table.c.key == key)).first()
        return None if row is None else str(row[0])

    def claim_meta(self, key: str, value: str) -> str:
        """Set `key` unless it is set already (the first writer wins, even against another replica starting at the
        same moment); returns the value it holds."""
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.insert(meta_table).values(key=key, value=value))
            return value
        except sa.exc.IntegrityError:
            found = self.read_meta(key)
            assert found is not None
            return found

    def write_meta(self, key: str, value: str) -> None:
        with self.engine.begin() as conn:
            if conn.execute(sa.select(meta_table.c.key).where(meta_table.c.key == key)).first() is None:
                conn.execute(sa.insert(meta_table).values(key=key, value=value))
            else:
                conn.execute(sa.update(meta_table).where(meta_table.c.key == key).values(value=value))

    def count_rows(self) -> int:
        """Experts plus jobs (0 for a database without tables): is this registry empty?"""
        with self.engine.connect() as conn:
            names = set(sa.inspect(conn).get_table_names())
            return sum(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                       for t in (experts_table, jobs_table) if t.name in names)

    def ping(self) -> bool:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True

    def close(self) -> None:
        self.engine.dispose()

    # -- experts ------------------------------------------------------------------------------
    def insert_expert(self, record: ExpertRecord) -> ExpertRecord:
        now = time.time()
        record.created_at = record.created_at or now
        record.updated_at = now
        self._recent.pop(record.id, None)
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.insert(experts_table).values(**record.to_dict()))
        except sa.exc.IntegrityError:
            raise ExpertExistsError(record.id) from None
        return record

    def get_expert(self, expert_id: str, *, max_age_s: float = 0.0) -> ExpertRecord:
        """The row. With `max_age_s`, a copy read at most that long ago may answer without a query (the
        serving path: a change made through this registry shows at once, one made by another process within
        `max_age_s`)."""
        if max_age_s > 0:
            hit = self._recent.get(expert_id)
            if hit is not None and time.monotonic() - hit[0] <= max_age_s:
                return pickle.loads(hit[1])
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(experts_table).where(experts_table.c.id == expert_id)).mappings().first()
        if row is None:
            self._recent.pop(expert_id, None)
            raise ExpertNotFoundError(expert_id)
        record = ExpertRecord(**dict(row))
        if len(self._recent) >= RECENT_ROWS:
            self._recent.clear()
        self._recent[expert_id] = (time.monotonic(), pickle.dumps(record))
        return record

    def forget_recent(self, expert_id: str) -> None:
        """Drop the copy `get_expert(max_age_s=...)` may answer with (the row changed elsewhere)."""
        self._recent.pop(expert_id, None)

    def has_expert(self, expert_id: str) -> bool:
        with self.engine.connect() as conn:
            q = sa.select(experts_table.c.id).where(experts_table.c.id == expert_id)
            return conn.execute(q).first() is not None

    def list_experts(self, *, kind: str | None = None) -> list[ExpertRecord]:
        q = sa.select(experts_table).order_by(experts_table.c.created_at, experts_table.c.id)
        if kind is not None:
            q = q.where(experts_table.c.kind == kind)
        with self.engine.connect() as conn:
            return [ExpertRecord(**dict(r)) for r in conn.execute(q).mappings()]

    def update_expert(self, expert_id: str, **values: Any) -> ExpertRecord:
        self._recent.pop(expert_id, None)
        values["updated_at"] = time.time()
        with self.engine.begin() as conn:
            res = conn.execute(sa.update(experts_table).where(experts_table.c.id == expert_id).values(**values))
        self._recent.pop(expert_id, None)  # a read between the two pops may have kept the old row
        if res.rowcount == 0:
            raise ExpertNotFoundError(expert_id)
        return self.get_expert(expert_id)

    def delete_expert(self, expert_id: str) -> None:
        self._recent.pop(expert_id, None)
        with self.engine.begin() as conn:
            res = conn.execute(sa.delete(experts_table).where(experts_table.c.id == expert_id))
        self._recent.pop(expert_id, None)
        if res.rowcount == 0:
            raise ExpertNotFoundError(expert_id)

    # -- jobs ---------------------------------------------------------------------------------
    def insert_job(self, job: JobRecord) -> JobRecord:
        job.created_at = job.updated_at = time.time()
        with self.engine.begin() as conn:
            conn.execute(sa.insert(jobs_table).values(**job.to_dict()))
        return job

    def get_job(self, job_id: str) -> JobRecord:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs_table).where(jobs_table.c.id == job_id)).mappings().first()
        if row is None:
            raise JobNotFoundError(job_id)
        return JobRecord(**dict(row))

    def list_jobs(self, *, status: str | None = None, kind: str | None = None, limit: int = 100) -> list[JobRecord]:
        q = sa.select(jobs_table).order_by(jobs_table.c.created_at.desc()).limit(limit)
        if status is not None:
            q = q.where(jobs_table.c.status == status)
        if kind is not None:
            q = q.where(jobs_table.c.kind == kind)
        with self.engine.connect() as conn:
            return [JobRecord(**dict(r)) for r in conn.execute(q).mappings()]

    def update_job(self, job_id: str, *, only_if_status: Sequence[str] | None = None, **values: Any) -> bool:
        """Update a job; with `only_if_status` the update is a compare-and-set. Returns whether it applied."""
        values["updated_at"] = time.time()
        q = sa.update(jobs_table).where(jobs_table.c.id == job_id)
        if only_if_status is not None:
            q = q.where(jobs_table.c.status.in_(list(only_if_status)))
        with self.engine.begin() as conn:
            return conn.execute(q.values(**values)).rowcount > 0

    def fail_orphaned_jobs(self, owner: str, message: str) -> int:
        """Jobs this instance was running or had queued when it died: mark them failed."""
        return self._fail_jobs(jobs_table.c.owner == owner, message)

    def renew_leases(self, owner: str, job_ids: Sequence[str], until: float) -> int:
        """The owner's heartbeat: its live jobs stay its own until `until`."""
        if not job_ids:
            return 0
        q = (sa.update(jobs_table)
             .where(jobs_table.c.owner == owner, jobs_table.c.id.in_(list(job_ids)),
                    jobs_table.c.status.in_(["queued", "running"]))
             .values(lease_until=until))
        with self.engine.begin() as conn:
            return conn.execute(q).rowcount

    def live_jobs(self) -> list[tuple[str, str | None, float | None]]:
        """(id, owner, lease_until) of every queued or running job."""
        q = sa.select(jobs_table.c.id, jobs_table.c.owner, jobs_table.c.lease_until).where(
            jobs_table.c.status.in_(["queued", "running"]))
        with self.engine.connect() as conn:
            return [(r[0], r[1], r[2]) for r in conn.execute(q)]

    def fail_abandoned_jobs(self, job_ids: Sequence[str], message: str, *, now: float | None = None) -> int:
        """Fail these jobs if they are still live and their lease has not been renewed past `now` since they were
        judged abandoned (a compare-and-set: a replica that renewed in between keeps its job)."""
        if not job_ids:
            return 0
        now = time.time() if now is None else now
        lease = jobs_table.c.lease_until
        return self._fail_jobs(sa.and_(jobs_table.c.id.in_(list(job_ids)), sa.or_(lease.is_(None), lease < now)),
                               message)

    def fail_jobs_of(self, owners: Sequence[str], message: str) -> int:
        """Fail the live jobs of owners known to be dead (whatever their lease says)."""
        return self._fail_jobs(jobs_table.c.owner.in_(list(owners)), message) if owners else 0

    def _fail_jobs(self, where: Any, message: str) -> int:
        now = time.time()
        q = (
            sa.update(jobs_table)
            .where(where, jobs_table.c.status.in_(["queued", "running"]))
            .values(status="failed", error=message, finished_at=now, updated_at=now)
        )
        with self.engine.begin() as conn:
            return conn.execute(q).rowcount
