"""A throw-away PostgreSQL server for the tests: `initdb` and `pg_ctl` in a temporary directory, on a free port
of 127.0.0.1, stopped (and its directory removed) when the session ends. No pytest plugin: Debian's
`postgresql` package is all it needs (scripts/setup installs it on CI). PostgreSQL refuses to run as root, so
under root the server runs as the `postgres` user (or `nobody`)."""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from tests.helpers import free_port

USER = "mergegate"


def find_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def unavailable() -> str | None:
    """Why no PostgreSQL server can be started here (None: it can)."""
    missing = [n for n in ("initdb", "pg_ctl") if find_bin(n) is None]
    if missing:
        return (f"PostgreSQL is not installed ({', '.join(missing)} not found): install Debian's `postgresql` "
                "package (scripts/setup does it under root) to run the PostgreSQL tests")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed: pip install -e '.[dev]' (it brings psycopg[binary])"
    if os.geteuid() == 0 and _run_as() is None:
        return "running as root and neither a `postgres` nor a `nobody` user exists to run PostgreSQL as"
    return None


def _run_as() -> pwd.struct_passwd | None:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


class PostgresServer:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mergegate-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.user = _run_as() if os.geteuid() == 0 else None
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.started = False

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.user.pw_name, "--", *args] if self.user is not None else list(args)

    def start(self) -> PostgresServer:
        initdb, pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
        assert initdb and pg_ctl
        subprocess.run(self._cmd(initdb, "-D", str(self.data), "-A", "trust", "-U", USER, "-E", "UTF8",
                                 "--no-sync"), check=True, capture_output=True, timeout=120)
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        subprocess.run(self._cmd(pg_ctl, "-D", str(self.data), "-o", opts, "-l", str(self.dir / "server.log"),
                                 "-w", "-t", "60", "start"), check=True, capture_output=True, timeout=90)
        self.started = True
        atexit.register(self.stop)  # pytest killed before its finalizers: the server still goes
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres", autocommit=True) as c:
            c.execute(sql)

    def create_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self._admin(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        self._admin(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")

    def stop(self) -> None:
        if self.started:
            self.started = False
            subprocess.run(self._cmd(find_bin("pg_ctl") or "pg_ctl", "-D", str(self.data), "-m", "immediate",
                                     "-w", "stop"), capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)
