"""Gateway replicas sharing one registry database and one data dir: who is alive, and a heartbeat.

Each gateway process is a replica with an id of its own (`gw-<hex>`), made at start. While it lives it holds
an exclusive `flock` on `<data dir>/replicas/<id>.lock`, a file that also says on which host and under which
pid it runs. That makes death visible without waiting: a replica on the same host whose lock can be taken is
gone (killed, crashed), so its jobs are failed and its staging debris removed at once. A replica on another
host (a shared filesystem's locks are not trusted) is judged by its jobs' leases only (experts.repository.jobs).

`Heartbeat` runs a few small callables every `interval_s` on one daemon thread (renew leases, fail abandoned
jobs, drop cached models that changed on another replica), bounded by its stop event.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("mergegate.replicas")

REPLICA_ID = re.compile(r"^gw-[0-9a-f]{12}$")
DIR = "replicas"


class Replica:
    """This process as a replica: its id and the lock that says it is alive."""

    def __init__(self, data_dir: Path, replica_id: str | None = None) -> None:
        self.dir = data_dir / DIR
        self.id = replica_id or f"gw-{uuid.uuid4().hex[:12]}"
        self.host = socket.gethostname()
        self._fd: int | None = None

    @property
    def lock_path(self) -> Path:
        return self.dir / f"{self.id}.lock"

    def acquire(self) -> Replica:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": self.host, "pid": os.getpid(), "started_at": time.time()}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self.lock_path.unlink(missing_ok=True)
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def is_dead(self, other: str) -> bool:
        """Whether replica `other` is known to be gone: no lock file (it never was one, or stopped cleanly), or a
        lock file of this host that nobody holds. A replica on another host is never judged dead here."""
        if other == self.id:
            return False
        path = self.dir / f"{other}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        try:
            try:
                host = json.loads(os.read(fd, 4096) or b"{}").get("host")
            except ValueError:
                host = None  # being written right now, or debris: decided by the lock alone on this host
            if host not in (None, self.host):
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # held: alive
            path.unlink(missing_ok=True)  # a dead replica's file: nobody will take it again
            return True
        finally:
            os.close(fd)

    def others(self) -> list[str]:
        """Ids of the other replicas with a lock file (alive, or not yet known to be dead)."""
        if not self.dir.is_dir():
            return []
        names = (p.name.removesuffix(".lock") for p in self.dir.glob("gw-*.lock"))
        return [n for n in names if n != self.id and REPLICA_ID.match(n)]

    def others_alive(self) -> bool:
        return any(not self.is_dead(o) for o in self.others())


class Heartbeat:
    """Calls each task every `interval_s` on one daemon thread until `stop()`; a task's error is logged, never
    fatal."""

    def __init__(self, tasks: Sequence[Callable[[], object]], interval_s: float) -> None:
        self.tasks = list(tasks)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mergegate-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def beat(self) -> None:
        for task in self.tasks:
            try:
                task()
            except Exception as e:  # a database hiccup: the next beat tries again
                log.warning("heartbeat task %s failed: %s", getattr(task, "__name__", task), e)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
