"""Artifact store: expert directories under `<data_dir>/experts`, written through a staging area.

Every new artifact is assembled in `<data_dir>/staging/<uuid>` (same filesystem) and moved into
place with one `os.rename`, so a reader never sees a half-written expert and a crash leaves only
staging debris, which `cleanup()` removes on the next start. Uploads are spooled there too.

Several replicas may share one data dir (experts.repository.replicas): each names its staging entries
`<replica id>-<uuid>`, and `cleanup()` removes only those of replicas known to be dead (and entries of no
replica, from before replicas had ids), never a live replica's upload or merge in progress.

An artifact without a registry row is never deleted on a guess: `quarantine()` moves it to
`<data_dir>/orphans/`, from where an admin re-adopts it or deletes it explicitly.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from experts.errors import InvalidExpertError, OrphanNotFoundError

ORPHAN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$")
ARTIFACT_SUFFIX = re.compile(r"-[0-9a-f]{8}(-[0-9a-f]{6})?$")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
STAGING_OWNER = re.compile(r"^(?:trash-)?(gw-[0-9a-f]{12})-")
ORPHAN_GRACE_S = 600.0  # while other replicas live, a younger artifact without a row may be one being registered


def check_expert_id(expert_id: str) -> str:
    if not ID_PATTERN.match(expert_id or ""):
        raise InvalidExpertError(
            f"invalid expert id {expert_id!r}: use 1-128 characters from letters, digits, '.', '_', ':', '-', "
            "starting with a letter or digit"
        )
    return expert_id


@dataclass(frozen=True)
class Orphan:
    """A quarantined artifact directory in `<data_dir>/orphans`."""

    name: str
    path: Path
    files: list[str]
    size_bytes: int
    modified_at: float
    looks_like: str  # "model" (config.json), "adapter" (adapter_config.json) or "unknown"
    suggested_id: str  # the expert id its directory name was made from

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "files": self.files, "size_bytes": self.size_bytes,
                "modified_at": self.modified_at, "looks_like": self.looks_like, "suggested_id": self.suggested_id}


class ArtifactStore:
    def __init__(self, data_dir: Path, *, replica_id: str | None = None) -> None:
        self.root = data_dir
        self.replica_id = replica_id  # prefixes this process's staging entries
        self.experts_dir = data_dir / "experts"
        self.staging_dir = data_dir / "staging"
        self.orphans_dir = data_dir / "orphans"
        for d in (self.experts_dir, self.staging_dir, self.orphans_dir):
            d.mkdir(parents=True, exist_ok=True)

    def cleanup(self, is_dead: Callable[[str], bool] | None = None, *, legacy: bool = True) -> int:
        """Remove staging debris left by a crash: every entry, or with `is_dead` only those of a dead replica
        (other replicas share this data dir) and, with `legacy`, those of no replica. Returns how many went."""
        n = 0
        for p in self.staging_dir.iterdir():
            m = STAGING_OWNER.match(p.name)
            owner = m.group(1) if m else None
            if owner is None and not legacy or owner is not None and owner == self.replica_id or (
                    is_dead is not None and owner is not None and not is_dead(owner)):
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            n += 1
        return n

    def _staging_name(self) -> str:
        return f"{self.replica_id}-{uuid.uuid4().hex}" if self.replica_id else uuid.uuid4().hex

    def new_staging(self) -> Path:
        p = self.staging_dir / self._staging_name()
        p.mkdir()
        return p

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def commit(self, staging: Path, expert_id: str) -> str:
        """Atomically move a staged directory into the store; returns its path relative to the data dir."""
        final = self.experts_dir / f"{expert_id.replace(':', '_')}-{uuid.uuid4().hex[:8]}"
        os.rename(staging, final)
        now = time.time()
        os.utime(final, (now, now))  # its age says when it was committed (see `orphans`)
        fsync_dir(self.experts_dir)
        return str(final.relative_to(self.root))

    def resolve(self, rel_path: str) -> Path:
        return self.root / rel_path

    def remove(self, rel_path: str | None) -> None:
        if not rel_path:
            return
        p = self.root / rel_path
        if not p.exists():
            return
        trash = self.staging_dir / f"trash-{self._staging_name()}"
        os.rename(p, trash)  # atomic: the artifact disappears at once, then is deleted
        shutil.rmtree(trash, ignore_errors=True)

    def orphans(self, known: set[str], *, grace_s: float = 0.0) -> list[Path]:
        """Artifact directories no registry row points to (e.g. a crash between rename and insert); with
        `grace_s`, only those committed longer ago than that (another replica may be inserting the row now)."""
        cutoff = time.time() - grace_s
        return [p for p in self.experts_dir.iterdir()
                if str(p.relative_to(self.root)) not in known and (grace_s <= 0 or p.stat().st_mtime < cutoff)]

    # -- quarantine ---------------------------------------------------------------------------
    def quarantine(self, artifact: Path) -> Path:
        """Move an artifact without a row to `<data_dir>/orphans/` (one rename; never deleted here)."""
        dest = self.orphans_dir / artifact.name
        if dest.exists():
            dest = self.orphans_dir / f"{artifact.name}-{uuid.uuid4().hex[:6]}"
        os.rename(artifact, dest)
        fsync_dir(self.orphans_dir)
        return dest

    def orphan_path(self, name: str) -> Path:
        p = self.orphans_dir / name
        if not ORPHAN_NAME.match(name or "") or not p.is_dir() or p.is_symlink():
            raise OrphanNotFoundError(name)
        return p

    def list_orphans(self) -> list[Orphan]:
        out = []
        for p in sorted(self.orphans_dir.iterdir()):
            if not p.is_dir() or p.is_symlink() or not ORPHAN_NAME.match(p.name):
                continue
            files = sorted(f for f in p.rglob("*") if f.is_file() and not f.is_symlink())
            looks = "adapter" if (p / "adapter_config.json").is_file() else \
                "model" if (p / "config.json").is_file() else "unknown"
            out.append(Orphan(p.name, p, [str(f.relative_to(p)) for f in files],
                              sum(f.stat().st_size for f in files), p.stat().st_mtime, looks,
                              ARTIFACT_SUFFIX.sub("", p.name)))
        return out

    def delete_orphan(self, name: str) -> None:
        p = self.orphan_path(name)
        trash = self.staging_dir / f"trash-{self._staging_name()}"
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def link_into_staging(self, files: list[Path]) -> Path:
        """A new staging directory holding `files` as hard links (copies where links are refused): adopting
        an orphan costs no copy, and a failed adoption leaves the orphan untouched."""
        staging = self.new_staging()
        try:
            for f in files:
                try:
                    os.link(f, staging / f.name)
                except OSError:
                    shutil.copy2(f, staging / f.name)
        except BaseException:
            self.discard(staging)
            raise
        return staging


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort: some filesystems refuse to fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
