"""Model archives: a clear refusal for every malformed archive (nothing written), and only the files a
model directory needs are kept, the rest reported as dropped."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from experts.errors import InvalidExpertError
from experts.hf.validation import is_model_file
from experts.repository.archives import check_upload_filename, safe_extract


def tar_bytes(members: dict[str, bytes | None], mode: str = "w") -> bytes:
    """None: a directory entry."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def model_members(model_dir: Path, prefix: str = "") -> dict[str, bytes | None]:
    return {prefix + p.name: p.read_bytes() for p in sorted(model_dir.iterdir()) if p.is_file()}


def extract(tmp_path: Path, data: bytes, name: str = "a.tar", max_bytes: int = 1 << 30):
    arc = tmp_path / name
    arc.write_bytes(data)
    dest = tmp_path / f"out-{name}"
    dest.mkdir()
    return safe_extract(arc, dest, max_bytes=max_bytes, keep=is_model_file), dest


def bad_crc_zip(model_dir: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for p in sorted(model_dir.iterdir()):
            zf.write(p, p.name)
    data = bytearray(buf.getvalue())
    at = data.index(b'"model_type"')  # inside config.json's stored bytes
    data[at + 2] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("case, words", [
    ("file and directory", "is a file, but 'config.json/inner' uses it as a directory"),
    ("bad crc", "corrupt or truncated"),
    ("truncated tar", "truncated"),
    ("truncated tar.gz", "truncated"),
    ("long name", "is 300 bytes long; the limit is 255"),
    ("twice", "holds 'config.json' twice"),
    ("not an archive", "neither a zip nor a tar"),
])
def test_malformed_archives_are_refused_clearly_and_write_nothing(tmp_path, tiny_model_dir, case, words):
    members = model_members(tiny_model_dir)
    if case == "file and directory":
        data, name = tar_bytes({**members, "config.json/inner": b"x"}), "a.tar"
    elif case == "bad crc":
        data, name = bad_crc_zip(tiny_model_dir), "a.zip"
    elif case == "truncated tar":
        whole = tar_bytes(members)
        data, name = whole[: len(whole) // 2], "a.tar"
    elif case == "truncated tar.gz":
        whole = tar_bytes(members, "w:gz")
        data, name = whole[: len(whole) // 2], "a.tar.gz"
    elif case == "long name":
        data, name = tar_bytes({**members, "x" * 300: b"1"}), "a.tar"
    elif case == "twice":
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for _ in range(2):
                info = tarfile.TarInfo("config.json")
                info.size = 2
                tf.addfile(info, io.BytesIO(b"{}"))
        data, name = buf.getvalue(), "a.tar"
    else:
        data, name = b"just some bytes" * 100, "a.tar"
    with pytest.raises(InvalidExpertError, match=words):
        extract(tmp_path, data, name)


def test_only_model_files_are_kept_and_the_rest_is_reported(tmp_path, tiny_model_dir):
    members = {**model_members(tiny_model_dir, "my-model/"), "my-model/zeros.bin": b"\0" * (1 << 20),
               "my-model/checkpoints/": None, "my-model/checkpoints/step-1.safetensors": b"x",
               "my-model/README.md": b"# card", "__MACOSX/._config.json": b"junk"}
    report, dest = extract(tmp_path, tar_bytes(members, "w:gz"), "a.tar.gz")
    kept = sorted(p.name for p in dest.iterdir())
    assert kept == sorted(report.kept) and "config.json" in kept and "model.safetensors" in kept
    assert "README.md" in kept and "zeros.bin" not in kept
    assert sorted(report.dropped) == ["__MACOSX/._config.json", "my-model/checkpoints/step-1.safetensors",
                                      "my-model/zeros.bin"]


def test_the_size_limit_counts_what_is_kept(tmp_path, tiny_model_dir):
    members = {**model_members(tiny_model_dir), "zeros.bin": b"\0" * (4 << 20)}
    size = sum(len(v or b"") for k, v in members.items() if k != "zeros.bin")
    report, _ = extract(tmp_path, tar_bytes(members), max_bytes=size)
    assert report.dropped == ["zeros.bin"]
    with pytest.raises(InvalidExpertError, match="over the limit"):
        extract(tmp_path, tar_bytes(members), "b.tar", max_bytes=size - 1)


def test_upload_file_names():
    assert check_upload_filename("config.json") == "config.json"
    for bad in ("../x", "a/b", ".hidden", "", "x" * 300, "a\0b"):
        with pytest.raises(InvalidExpertError):
            check_upload_filename(bad)
