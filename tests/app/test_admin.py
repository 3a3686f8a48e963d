"""Admin API: registering (path and upload), validation that leaves no trace, removal, loading, jobs."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.helpers import CLIENT_KEY, poison_weights, rewrite_safetensors_header


def artifacts(gw) -> set[str]:
    return {p.name for p in (gw.data_dir / "experts").iterdir()}


def staging(gw) -> list[Path]:
    return list((gw.data_dir / "staging").iterdir())


def expert_ids(gw) -> set[str]:
    with gw.admin() as c:
        return {e["id"] for e in c.get("/admin/experts").json()["data"]}


@pytest.fixture()
def snapshot(gateway):
    """Asserts the repository is unchanged by the test body (for rejected input)."""
    before = (artifacts(gateway), expert_ids(gateway))
    yield
    assert (artifacts(gateway), expert_ids(gateway)) == before
    assert staging(gateway) == []


def files_of(model_dir: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (p.name, p.read_bytes())) for p in sorted(model_dir.iterdir()) if p.is_file()]


def test_register_by_path_inspect_and_delete(gateway, tiny_model_dir):
    with gateway.admin() as c:
        r = c.post("/admin/experts", json={"id": "by-path", "path": str(tiny_model_dir), "tags": ["a"],
                                           "domain": "docs", "lineage": {"parents": [], "recipe": None}})
        assert r.status_code == 201, r.text
        e = r.json()
        assert e["kind"] == "local" and e["status"] == "ready" and e["architecture"] == "GPT2LMHeadModel"
        assert e["num_params"] > 0 and e["context_length"] == 128 and len(e["tokenizer_fingerprint"]) == 64
        assert c.get("/admin/experts/by-path").json()["tags"] == ["a"]
        assert c.post("/admin/experts", json={"id": "by-path", "path": str(tiny_model_dir)}).status_code == 409
        jobs = c.get("/admin/jobs", params={"kind": "register_expert"}).json()["data"]
        assert any(j["params"]["id"] == "by-path" and j["status"] == "succeeded" for j in jobs)
        assert c.delete("/admin/experts/by-path").json() == {"id": "by-path", "object": "expert", "deleted": True}
        assert c.get("/admin/experts/by-path").status_code == 404
    assert not any(a.startswith("by-path") for a in artifacts(gateway))


def test_upload_files_then_serve(gateway, tiny_model_dir):
    with gateway.admin() as c:
        r = c.post("/admin/experts/upload", data={"id": "uploaded", "tags": "x,y"}, files=files_of(tiny_model_dir))
        assert r.status_code == 201, r.text
        assert r.json()["tags"] == ["x", "y"]
    r = httpx.post(gateway.base + "/v1/completions", headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                   json={"model": "uploaded", "prompt": "abc", "max_tokens": 3, "temperature": 0})
    ref = httpx.post(gateway.base + "/v1/completions", headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                     json={"model": "tiny", "prompt": "abc", "max_tokens": 3, "temperature": 0})
    assert r.json()["choices"][0]["text"] == ref.json()["choices"][0]["text"]  # same weights, same output
    with gateway.admin() as c:
        c.delete("/admin/experts/uploaded")


def test_upload_archive_in_background_and_follow_job(gateway, tiny_model_dir, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(tiny_model_dir, arcname="tiny-model")  # a single top folder is flattened
    with gateway.admin() as c:
        r = c.post("/admin/experts/upload", params={"background": "true"}, data={"id": "from-tar"},
                   files={"archive": ("m.tar.gz", buf.getvalue())})
        assert r.status_code == 202, r.text
        job = r.json()
        events = []
        with c.stream("GET", f"/admin/jobs/{job['id']}/events") as s:
            for line in s.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
        assert events[-1]["status"] == "succeeded" and events[-1]["progress"] == 1.0
        assert events[-1]["result"] == {"expert": "from-tar", "dropped_files": []}
        assert c.get(f"/admin/jobs/{job['id']}").json()["status"] == "succeeded"
        assert c.post(f"/admin/jobs/{job['id']}/cancel").status_code == 409  # already finished
        assert c.get("/admin/experts/from-tar").status_code == 200
        c.delete("/admin/experts/from-tar")


def _corrupt_weights(d: Path) -> None:
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])


def _mismatched_config(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_embd"] = 32
    (d / "config.json").write_text(json.dumps(cfg))


def _no_tokenizer(d: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (d / name).unlink(missing_ok=True)


def _garbage_header(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not-json-at-all!" + b"\0" * 64)


def _overlapping_offsets(d: Path) -> None:
    def change(h: dict) -> None:
        a, b = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])[:2]
        size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
        h[b]["data_offsets"] = [h[a]["data_offsets"][1] - 4, h[a]["data_offsets"][1] - 4 + size]
    rewrite_safetensors_header(d / "model.safetensors", change)


def _unknown_dtype(d: Path) -> None:
    rewrite_safetensors_header(d / "model.safetensors",
                               lambda h: h[next(k for k in h if k != "__metadata__")].update(dtype="Q7"))


def _nan_weights(d: Path) -> None:
    poison_weights(d / "model.safetensors", "wte")


def _not_causal(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "vit"
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("breakage, words", [
    (_corrupt_weights, "truncated"), (_mismatched_config, "shape"), (_no_tokenizer, "tokenizer"),
    (_garbage_header, "header"), (_not_causal, "causal"), (_overlapping_offsets, "overlap"),
    (_unknown_dtype, "unknown dtype 'Q7'"), (_nan_weights, "not finite"),
])
def test_bad_uploads_are_refused_and_leave_nothing(gateway, tiny_model_dir, tmp_path, snapshot, breakage, words):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    breakage(bad)
    with gateway.admin() as c:
        r = c.post("/admin/experts/upload", data={"id": "bad-one"}, files=files_of(bad))
        assert r.status_code == 400, r.text
        assert words in r.json()["error"]["message"]
        r = c.post("/admin/experts", json={"id": "bad-one", "path": str(bad)})
        assert r.status_code == 400 and words in r.json()["error"]["message"]


def test_archive_path_traversal_refused(gateway, tiny_model_dir, snapshot, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in tiny_model_dir.iterdir():
            zf.write(p, p.name)
        zf.writestr("../../escaped.txt", "gotcha")
    with gateway.admin() as c:
        r = c.post("/admin/experts/upload", data={"id": "evil"}, files={"archive": ("m.zip", buf.getvalue())})
    assert r.status_code == 400 and "escapes" in r.json()["error"]["message"]
    assert not (gateway.data_dir / "escaped.txt").exists() and not (gateway.data_dir.parent / "escaped.txt").exists()


def test_bad_file_names_and_ids(gateway, tiny_model_dir, snapshot):
    with gateway.admin() as c:
        files = files_of(tiny_model_dir) + [("files", ("../x.json", b"{}"))]
        assert c.post("/admin/experts/upload", data={"id": "ok-id"}, files=files).status_code == 400
        r = c.post("/admin/experts/upload", data={"id": "bad/id"}, files=files_of(tiny_model_dir))
        assert r.status_code == 400 and "invalid expert id" in r.json()["error"]["message"]
        assert c.post("/admin/experts", json={"id": "rel", "path": "relative/dir"}).status_code == 400
        assert c.post("/admin/experts", json={"id": "nodir", "path": "/does/not/exist"}).status_code == 400


def test_huge_upload_gets_413(gateway, snapshot):
    with gateway.admin() as c:
        r = c.post("/admin/experts/upload", data={"id": "huge"}, files={"archive": ("m.tar", b"\0" * (9 << 20))})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_load_unload_pin(gateway):
    with gateway.admin() as c:
        assert c.post("/admin/experts/tiny/load").json() == {"id": "tiny", "loaded": True, "pinned": False}
        assert c.post("/admin/experts/tiny/unload").json()["loaded"] is False
        assert c.get("/admin/experts/tiny").json()["loaded"] is False
        r = c.post("/admin/experts/tiny/pin", json={"pinned": True}).json()
        assert r == {"id": "tiny", "loaded": True, "pinned": True}
        assert c.get("/admin/experts/tiny").json()["pinned"] is True
        assert c.post("/admin/experts/tiny/pin", json={"pinned": False}).json()["pinned"] is False
        assert c.post("/admin/experts/ghost/load").status_code == 404


def test_openapi_documents_every_endpoint(gateway):
    spec = httpx.get(gateway.base + "/openapi.json").json()
    paths = spec["paths"]
    for p in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/admin/experts", "/admin/experts/upload",
              "/admin/experts/{expert_id}", "/admin/jobs", "/admin/jobs/{job_id}/events", "/health", "/metrics"):
        assert p in paths
    assert "examples" in json.dumps(spec["components"]["schemas"]["CompletionRequest"])
