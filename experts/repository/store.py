"""Artifact store: expert directories under `<data_dir>/experts`, written through a staging area.

Every new artifact is assembled in `<data_dir>/staging/<uuid>` (same filesystem) and moved into
place with one `os.rename`, so a reader never sees a half-written expert and a crash leaves only
staging debris, which `cleanup()` removes on the next start.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import uuid
import zipfile
from pathlib import Path, PurePosixPath

from experts.errors import InvalidExpertError

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def check_expert_id(expert_id: str) -> str:
    if not ID_PATTERN.match(expert_id or ""):
        raise InvalidExpertError(
            f"invalid expert id {expert_id!r}: use 1-128 characters from letters, digits, '.', '_', ':', '-', "
            "starting with a letter or digit"
        )
    return expert_id


class ArtifactStore:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir
        self.experts_dir = data_dir / "experts"
        self.staging_dir = data_dir / "staging"
        for d in (self.experts_dir, self.staging_dir):
            d.mkdir(parents=True, exist_ok=True)

    def cleanup(self) -> None:
        """Remove staging debris left by a crash."""
        for p in self.staging_dir.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def new_staging(self) -> Path:
        p = self.staging_dir / uuid.uuid4().hex
        p.mkdir()
        return p

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def commit(self, staging: Path, expert_id: str) -> str:
        """Atomically move a staged directory into the store; returns its path relative to the data dir."""
        final = self.experts_dir / f"{expert_id.replace(':', '_')}-{uuid.uuid4().hex[:8]}"
        os.rename(staging, final)
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
        trash = self.staging_dir / f"trash-{uuid.uuid4().hex}"
        os.rename(p, trash)  # atomic: the artifact disappears at once, then is deleted
        shutil.rmtree(trash, ignore_errors=True)

    def orphans(self, known: set[str]) -> list[Path]:
        """Artifact directories no registry row points to (e.g. a crash between rename and insert)."""
        return [p for p in self.experts_dir.iterdir() if str(p.relative_to(self.root)) not in known]


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


def _safe_member_name(name: str) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise InvalidExpertError(f"archive member {name!r} escapes the archive (absolute path or '..')")
    return p


def safe_extract(archive: Path, dest: Path, *, max_bytes: int) -> None:
    """Extract a .tar(.gz/.bz2/.xz) or .zip archive into `dest`, refusing path traversal, links,
    special files and more than `max_bytes` of content. A single top-level folder is flattened."""
    total = 0
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                _safe_member_name(info.filename)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise InvalidExpertError(f"archive member {info.filename!r} is a link")
                total += info.file_size
            if total > max_bytes:
                raise InvalidExpertError(f"archive expands to {total} bytes, over the limit of {max_bytes}")
            for info in infos:
                if not info.is_dir():
                    _write_member(dest, _safe_member_name(info.filename), zf.open(info))
    else:
        try:
            tf = tarfile.open(archive)
        except tarfile.TarError:
            raise InvalidExpertError("the upload is neither a zip nor a tar archive") from None
        with tf:
            members = tf.getmembers()
            for m in members:
                _safe_member_name(m.name)
                if not (m.isfile() or m.isdir()):
                    raise InvalidExpertError(f"archive member {m.name!r} is not a regular file")
                total += m.size
            if total > max_bytes:
                raise InvalidExpertError(f"archive expands to {total} bytes, over the limit of {max_bytes}")
            for m in members:
                if m.isfile():
                    src = tf.extractfile(m)
                    assert src is not None
                    _write_member(dest, _safe_member_name(m.name), src)
    _flatten_single_dir(dest)


def _write_member(dest: Path, rel: PurePosixPath, src) -> None:
    target = dest.joinpath(*rel.parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    with src, target.open("wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)


def _flatten_single_dir(dest: Path) -> None:
    entries = [p for p in dest.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and not (dest / "config.json").exists():
        inner = entries[0]
        for p in inner.iterdir():
            os.rename(p, dest / p.name)
        inner.rmdir()


def check_upload_filename(name: str) -> str:
    """Plain file uploads must be bare names (config.json, model.safetensors, tokenizer.json...)."""
    base = name.replace("\\", "/")
    if not base or "/" in base or base in (".", "..") or base.startswith("."):
        raise InvalidExpertError(f"invalid upload file name {name!r}: send bare file names")
    return base
