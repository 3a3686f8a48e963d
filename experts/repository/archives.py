"""Unpacking uploaded model archives (.tar, .tar.gz/.bz2/.xz, .zip) into a staging directory.

Everything is checked before a byte is written: member names (no absolute paths, no '..', no
over-long names), member types (regular files and directories only), no name that is both a file
and a directory, no file twice. Only the files a model directory needs are extracted (the caller's
`keep`, e.g. `experts.hf.validation.is_model_file`), each checked against its declared size; the
rest is reported as dropped and never written. A corrupt or truncated archive is an
InvalidExpertError that says so, whichever layer of the archive notices it.
"""

from __future__ import annotations

import lzma
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from experts.errors import InvalidExpertError

MAX_NAME_BYTES = 255  # one path component, as most filesystems allow
MAX_PATH_BYTES = 1024
# What a damaged archive raises, at whichever layer notices (tar, zip, gzip, bz2, xz); an OSError with an
# errno is the machine's (a full disk), not the archive's, and is not one of these.
CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, NotImplementedError, OSError)
IGNORED_TOP = ("__MACOSX",)


@dataclass
class Extracted:
    """What an archive held: the files kept (bare names in `dest`) and the members dropped."""

    kept: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Member:
    name: str  # as in the archive
    path: PurePosixPath  # normalised
    size: int
    is_dir: bool
    handle: object  # TarInfo or ZipInfo


def check_name_length(name: str) -> None:
    for part in name.split("/"):
        n = len(part.encode("utf-8", "surrogatepass"))
        if n > MAX_NAME_BYTES:
            raise InvalidExpertError(f"file name {part[:40]!r}... is {n} bytes long; the limit is {MAX_NAME_BYTES}")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise InvalidExpertError(f"archive member path {name[:40]!r}... is longer than {MAX_PATH_BYTES} bytes")


def check_upload_filename(name: str) -> str:
    """Plain file uploads must be bare names (config.json, model.safetensors, tokenizer.json...)."""
    base = name.replace("\\", "/")
    if not base or "/" in base or base in (".", "..") or base.startswith(".") or "\0" in base:
        raise InvalidExpertError(f"invalid upload file name {name[:80]!r}: send bare file names")
    check_name_length(base)
    return base


def _member_path(name: str) -> PurePosixPath:
    clean = name.replace("\\", "/")
    if "\0" in clean:
        raise InvalidExpertError(f"archive member {name[:80]!r} has a NUL byte in its name")
    p = PurePosixPath(clean)
    if p.is_absolute() or ".." in p.parts or clean.startswith("/") or re.match(r"^[A-Za-z]:", clean):
        raise InvalidExpertError(f"archive member {name[:80]!r} escapes the archive (absolute path or '..')")
    check_name_length(clean)
    return PurePosixPath(*[part for part in p.parts if part != "."]) if p.parts else p


def _check_layout(members: list[_Member]) -> None:
    """No name is both a file and a directory, no file twice."""
    files: dict[PurePosixPath, str] = {}
    dirs: dict[PurePosixPath, str] = {}
    for m in members:
        if m.is_dir:
            dirs.setdefault(m.path, m.name)
            continue
        if m.path in files:
            raise InvalidExpertError(f"the archive holds {str(m.path)!r} twice")
        files[m.path] = m.name
        for parent in list(m.path.parents)[:-1]:
            dirs.setdefault(parent, m.name)
    for path, name in files.items():
        if path in dirs:
            raise InvalidExpertError(f"archive member {name!r} is a file, but {dirs[path]!r} uses it as a directory")


def _prefix(members: list[_Member]) -> PurePosixPath | None:
    """The single top-level folder to flatten, if every (non-hidden) file is under one."""
    files = [m.path for m in members if not m.is_dir and m.path.parts
             and not m.path.parts[0].startswith(".") and m.path.parts[0] not in IGNORED_TOP]
    tops = {p.parts[0] for p in files}
    if len(tops) == 1 and all(len(p.parts) > 1 for p in files):
        return PurePosixPath(tops.pop())
    return None


@contextmanager
def _open(archive: Path) -> Iterator[tuple[list[_Member], Callable[[_Member], IO[bytes]]]]:
    """The members of a zip or tar archive, and how to read one."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            members = []
            for info in zf.infolist():
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise InvalidExpertError(f"archive member {info.filename!r} is a link")
                if info.flag_bits & 0x1:
                    raise InvalidExpertError(f"archive member {info.filename!r} is encrypted")
                members.append(_Member(info.filename, _member_path(info.filename), info.file_size, info.is_dir(),
                                       info))
            yield members, lambda m: zf.open(m.handle)  # type: ignore[arg-type]
        return
    try:
        tf = tarfile.open(archive)
    except tarfile.TarError:
        raise InvalidExpertError("the upload is neither a zip nor a tar archive") from None
    with tf:
        members = []
        for info in tf.getmembers():
            if not (info.isfile() or info.isdir()):
                raise InvalidExpertError(f"archive member {info.name!r} is not a regular file")
            members.append(_Member(info.name, _member_path(info.name), info.size, info.isdir(), info))

        def read(m: _Member) -> IO[bytes]:
            f = tf.extractfile(m.handle)  # type: ignore[arg-type]
            if f is None:
                raise InvalidExpertError(f"archive member {m.name!r} cannot be read")
            return f

        yield members, read


def safe_extract(archive: Path, dest: Path, *, max_bytes: int, keep: Callable[[str], bool]) -> Extracted:
    """Extract the files worth keeping from a .tar(.gz/.bz2/.xz) or .zip archive into `dest` (flat: a
    single top-level folder is flattened, files in other folders are dropped). Refuses path traversal,
    links, special files, name clashes, over-long names, corrupt or truncated archives and more than
    `max_bytes` of kept content; on refusal, what was written to `dest` is the caller's to discard."""
    try:
        return _extract(archive, dest, max_bytes=max_bytes, keep=keep)
    except InvalidExpertError:
        raise
    except CORRUPT as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise
        raise InvalidExpertError(f"the archive is corrupt or truncated ({_reason(e)})") from None


def _extract(archive: Path, dest: Path, *, max_bytes: int, keep: Callable[[str], bool]) -> Extracted:
    out = Extracted()
    with _open(archive) as (members, read):
        _check_layout(members)
        prefix = _prefix(members)
        chosen: list[tuple[_Member, str]] = []
        for m in members:
            if m.is_dir:
                continue
            rel = m.path.relative_to(prefix) if prefix is not None and m.path.is_relative_to(prefix) else m.path
            if len(rel.parts) == 1 and keep(rel.name):
                chosen.append((m, rel.name))
            else:
                out.dropped.append(m.name)
        total = sum(m.size for m, _ in chosen)
        if total > max_bytes:
            raise InvalidExpertError(f"the archive's model files expand to {total} bytes, over the limit of "
                                     f"{max_bytes}")
        for m, name in chosen:
            _write(read(m), dest / name, m)
            out.kept.append(name)
    return out


def _write(src: IO[bytes], target: Path, m: _Member) -> None:
    written = 0
    with src, target.open("xb") as f:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > m.size:
                raise InvalidExpertError(f"archive member {m.name!r} holds more than its declared {m.size} bytes")
            f.write(chunk)
    if written != m.size:
        raise InvalidExpertError(f"archive member {m.name!r} is truncated ({written} of {m.size} bytes): the archive "
                                 "is corrupt or incomplete")


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 200 else text[:200] + "..."

