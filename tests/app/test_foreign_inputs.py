"""Registration by path and by upload refuses GGUF, quantised and pickled models with a 400 saying what to do,
and registers nothing."""

from __future__ import annotations

import io
import json
import shutil
import tarfile


def _tar(d) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for p in sorted(d.iterdir()):
            tf.add(p, arcname=p.name)
    return buf.getvalue()


def test_path_and_upload_refuse_foreign_formats(gateway, tiny_model_dir, tmp_path):
    gptq = shutil.copytree(tiny_model_dir, tmp_path / "gptq")
    cfg = json.loads((gptq / "config.json").read_text())
    (gptq / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "model-Q4_K_M.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    with gateway.admin() as c:
        r = c.post("/admin/experts", json={"id": "fx-gptq", "path": str(gptq)})
        assert r.status_code == 400 and "quant_method 'gptq'" in r.json()["error"]["message"], r.text
        r = c.post("/admin/experts", json={"id": "fx-gguf", "path": str(gguf)})
        assert r.status_code == 400 and "GGUF file (model-Q4_K_M.gguf)" in r.json()["error"]["message"], r.text
        r = c.post("/admin/experts/upload", data={"id": "fx-gguf-up"}, files={"archive": ("m.tar", _tar(gguf))})
        assert r.status_code == 400 and "GGUF" in r.json()["error"]["message"], r.text
        r = c.post("/admin/experts/upload", data={"id": "fx-gptq-up"},
                   files=[("files", (p.name, p.read_bytes())) for p in sorted(gptq.iterdir())])
        assert r.status_code == 400 and "dequantise" in r.json()["error"]["message"], r.text
        ids = {e["id"] for e in c.get("/admin/experts").json()["data"]}
    assert not ids & {"fx-gptq", "fx-gguf", "fx-gguf-up", "fx-gptq-up"}
