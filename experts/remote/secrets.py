"""API keys of remote upstreams, kept out of the registry: `<data_dir>/secrets/<expert-id>.key`.

The registry row (and so every API response built from it) never holds a key. Files are created
0600 inside a 0700 directory and replaced atomically (write a temp file, fsync, rename), so a crash
never leaves a half-written key. Keys are cached in memory after the first read; this process is
the only writer. Every key found at start-up, read or written joins the process's redaction set
(experts.remote.redact), so no response, job row or log line can carry it.
"""

from __future__ import annotations

import os
from pathlib import Path

from experts.remote.redact import REDACTOR
from experts.repository.store import check_expert_id


class SecretStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, str | None] = {}
        if root.is_dir():
            for path in root.glob("*.key"):
                try:
                    REDACTOR.add(path.read_text())
                except OSError:
                    pass

    def path(self, expert_id: str) -> Path:
        check_expert_id(expert_id)  # ids are path-safe; this keeps it that way
        return self.root / f"{expert_id}.key"

    def get(self, expert_id: str) -> str | None:
        if expert_id not in self._cache:
            try:
                self._cache[expert_id] = self.path(expert_id).read_text().strip() or None
                REDACTOR.add(self._cache[expert_id])
            except FileNotFoundError:
                self._cache[expert_id] = None
        return self._cache[expert_id]

    def has(self, expert_id: str) -> bool:
        return self.get(expert_id) is not None

    def set(self, expert_id: str, key: str) -> None:
        REDACTOR.add(key)
        path = self.path(expert_id)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, key.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o600)  # in case the file existed with wider permissions
        os.replace(tmp, path)
        self._cache[expert_id] = key

    def delete(self, expert_id: str) -> None:
        self.path(expert_id).unlink(missing_ok=True)
        self._cache.pop(expert_id, None)

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name.removesuffix(".key") for p in self.root.glob("*.key"))
