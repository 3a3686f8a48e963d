"""GET /admin/experts/{id}/export: a tar of a Hugging Face model directory that transformers loads, giving the
same outputs, with a model card naming the parents and the recipe."""

from __future__ import annotations

import io
import tarfile

import httpx
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import build_model_dir


def test_a_merged_expert_exports_loads_and_tells_its_lineage(gateway, tmp_path, tokenizer):
    for i in range(2):
        gateway.register(f"ex-{i}", build_model_dir(tmp_path / f"m{i}", tokenizer=tokenizer, seed=80 + i))
    recipe = {"method": "linear", "experts": [{"id": "ex-0", "weight": 0.7}, {"id": "ex-1", "weight": 0.3}]}
    with gateway.admin() as c:
        r = c.post("/admin/merges", params={"background": "false"}, json={"id": "ex-merged", "recipe": recipe})
        assert r.status_code == 201, r.text
        merged_dir = gateway.data_dir / r.json()["path"]
        r = c.get("/admin/experts/ex-merged/export")
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
        assert 'filename="ex-merged.tar"' in r.headers["content-disposition"]
        with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
            assert {m.name.split("/")[0] for m in tar.getmembers()} == {"ex-merged"}
            tar.extractall(tmp_path / "out", filter="data")
    out = tmp_path / "out" / "ex-merged"
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "Made by `merge`" in card
    assert "- `ex-0` (local expert, weight 0.7)" in card and "- `ex-1` (local expert, weight 0.3)" in card
    assert '"method": "linear"' in card
    ids = torch.tensor([[1, 5, 9, 2]])
    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    served = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, served(ids).logits, atol=0, rtol=0)


def test_export_refusals(gateway):
    with gateway.admin() as c:
        r = c.get("/admin/experts/no-such/export")
        assert r.status_code == 404 and "no-such" in r.json()["error"]["message"]
    assert httpx.get(gateway.base + "/admin/experts/no-such/export").status_code == 401
