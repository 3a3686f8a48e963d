"""Uploads through the API: archives keep only model files (the rest is reported as dropped), malformed
archives are clean 400s that leave nothing behind, uploads are spooled in the data dir (never the
system temp dir) and capped in number (429 in the OpenAI envelope)."""

from __future__ import annotations

import io
import os
import tarfile
import threading
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.app.test_admin import artifacts, expert_ids, files_of, staging
from tests.helpers import Gateway, wait_until


def tar_of(model_dir: Path, extra: dict[str, bytes] | None = None, mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for p in sorted(model_dir.iterdir()):
            tf.add(p, arcname=p.name)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture()
def nothing_left(gateway):
    before = (artifacts(gateway), expert_ids(gateway))
    yield
    assert (artifacts(gateway), expert_ids(gateway)) == before
    assert staging(gateway) == []


def test_an_archive_keeps_only_model_files_and_reports_the_rest(gateway, tiny_model_dir):
    data = tar_of(tiny_model_dir, {"zeros.bin": b"\0" * (3 << 20), "notes/todo.txt": b"x", "README.md": b"# card"})
    with gateway.admin() as c:
        r = c.post("/admin/experts/upload", data={"id": "with-junk"}, files={"archive": ("m.tar.gz", data)})
        assert r.status_code == 201, r.text
        body = r.json()
        assert sorted(body["dropped_files"]) == ["notes/todo.txt", "zeros.bin"]
        stored = {p.name for p in (gateway.data_dir / body["path"]).iterdir()}
        assert "zeros.bin" not in stored and {"config.json", "model.safetensors", "README.md"} <= stored
        assert body["size_bytes"] < 1 << 20  # the junk was not stored
        job = c.get("/admin/jobs", params={"kind": "register_upload"}).json()["data"][0]
        assert job["result"] == {"expert": "with-junk", "dropped_files": ["zeros.bin", "notes/todo.txt"]}
        c.delete("/admin/experts/with-junk")


def test_plain_files_keep_only_model_files_too(gateway, tiny_model_dir):
    files = files_of(tiny_model_dir) + [("files", ("optimizer.pt", b"\0" * 1000))]
    with gateway.admin() as c:
        r = c.post("/admin/experts/upload", data={"id": "files-junk"}, files=files)
        assert r.status_code == 201, r.text
        assert r.json()["dropped_files"] == ["optimizer.pt"]
        assert "optimizer.pt" not in {p.name for p in (gateway.data_dir / r.json()["path"]).iterdir()}
        c.delete("/admin/experts/files-junk")


def _file_and_dir(model_dir: Path) -> tuple[str, bytes]:
    return "m.tar", tar_of(model_dir, {"config.json/inner": b"x"}, mode="w")


def _bad_crc(model_dir: Path) -> tuple[str, bytes]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for p in sorted(model_dir.iterdir()):
            zf.write(p, p.name)
    data = bytearray(buf.getvalue())
    data[data.index(b'"model_type"') + 2] ^= 0xFF
    return "m.zip", bytes(data)


def _truncated_tar(model_dir: Path) -> tuple[str, bytes]:
    data = tar_of(model_dir, mode="w")
    return "m.tar", data[: len(data) // 2]


def _truncated_tgz(model_dir: Path) -> tuple[str, bytes]:
    data = tar_of(model_dir)
    return "m.tar.gz", data[: len(data) // 2]


def _long_name(model_dir: Path) -> tuple[str, bytes]:
    return "m.tar", tar_of(model_dir, {"n" * 300: b"1"}, mode="w")


def _pickled_only(model_dir: Path) -> tuple[str, bytes]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for p in sorted(model_dir.iterdir()):
            tf.add(p, arcname="pytorch_model.bin" if p.suffix == ".safetensors" else p.name)
    return "m.tar", buf.getvalue()


@pytest.mark.parametrize("make, words", [
    (_file_and_dir, "is a file, but 'config.json/inner' uses it as a directory"),
    (_bad_crc, "corrupt or truncated"), (_truncated_tar, "truncated"), (_truncated_tgz, "truncated"),
    (_long_name, "bytes long; the limit is 255"), (_pickled_only, "pickled"),
])
def test_malformed_archives_are_clean_400s(gateway, tiny_model_dir, nothing_left, make, words):
    name, data = make(tiny_model_dir)
    with gateway.admin() as c:
        r = c.post("/admin/experts/upload", data={"id": "broken-archive"}, files={"archive": (name, data)})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"] == "invalid_request_error"


def test_a_300_character_file_name_is_a_clean_400(gateway, tiny_model_dir, nothing_left):
    files = files_of(tiny_model_dir) + [("files", ("t" * 300 + ".json", b"{}"))]
    with gateway.admin() as c:
        r = c.post("/admin/experts/upload", data={"id": "long-name"}, files=files)
    assert r.status_code == 400 and "the limit is 255" in r.json()["error"]["message"]


def test_a_taken_id_is_refused_before_the_files_are_read(gateway, tiny_model_dir, nothing_left):
    with gateway.admin() as c:
        r = c.post("/admin/experts/upload", data={"id": "tiny"}, files=files_of(tiny_model_dir))
        assert r.status_code == 409 and r.json()["error"]["code"] == "expertexists"
        r = c.post("/admin/experts/upload", files=files_of(tiny_model_dir))
        assert r.status_code == 400 and r.json()["error"]["param"] == "id"
        r = c.post("/admin/experts/upload", json={"id": "x"})
        assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]


class HeldUpload:
    """A multipart upload sent in a thread that stops half-way through the archive until released."""

    def __init__(self, gw: Gateway, expert_id: str, archive: bytes) -> None:
        boundary = uuid.uuid4().hex
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"id\"\r\n\r\n{expert_id}\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"archive\"; filename=\"m.tar.gz\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        half = len(archive) // 2
        self.release = threading.Event()
        self.response: httpx.Response | None = None

        def body() -> Iterator[bytes]:
            yield head + archive[:half]
            self.release.wait(60)
            yield archive[half:] + tail

        def send() -> None:
            self.response = httpx.post(gw.base + "/admin/experts/upload", content=body(), timeout=120,
                                       headers={**gw.admin_headers,
                                                "Content-Type": f"multipart/form-data; boundary={boundary}"})

        self.thread = threading.Thread(target=send)
        self.thread.start()

    def finish(self) -> httpx.Response:
        self.release.set()
        self.thread.join(60)
        assert self.response is not None
        return self.response


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    assert wait_until(predicate, timeout, every=0.05), "timed out"


def test_uploads_are_spooled_in_the_data_dir_and_capped_in_number(tmp_path, tiny_model_dir):
    tmpdir = tmp_path / "system-tmp"
    tmpdir.mkdir()
    gw = Gateway(tmp_path / "data", extra_env={"MERGEGATE_MAX_CONCURRENT_UPLOADS": "1", "TMPDIR": str(tmpdir),
                                                "MERGEGATE_MAX_UPLOAD_BYTES": str(8 << 20)}).start()
    try:
        archive = tar_of(tiny_model_dir, {"noise.bin": os.urandom(3 << 20)})  # > 1 MiB on disk at half-way
        held = HeldUpload(gw, "first", archive)
        spools = lambda: [p for p in (gw.data_dir / "staging").iterdir() if p.is_file() and p.stat().st_size > 0]
        wait_for(lambda: bool(spools()))  # the first half is on disk, inside the data dir
        assert list(tmpdir.iterdir()) == []  # and nothing in the system temp dir
        with gw.admin() as c:
            r = c.post("/admin/experts/upload", data={"id": "second"}, files=files_of(tiny_model_dir))
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "too_many_uploads" and r.headers["retry-after"]
            assert r.json()["error"]["type"] == "rate_limit_error"
            first = held.finish()
            assert first.status_code == 201 and first.json()["dropped_files"] == ["noise.bin"]
            wait_for(lambda: c.post("/admin/experts/upload", data={"id": "second"},
                                    files=files_of(tiny_model_dir)).status_code == 201)
        assert list((gw.data_dir / "staging").iterdir()) == [] and list(tmpdir.iterdir()) == []
    finally:
        gw.stop()
