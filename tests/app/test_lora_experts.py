"""`lora` experts: register on a base, serve, refuse misfits, merge adapters into an adapter."""

from __future__ import annotations

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.helpers import CLIENT_KEY, build_adapter_dir, build_model_dir


@pytest.fixture(scope="module")
def adapters(gateway, tiny_model_dir, tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("adapters")
    out = {f"ad-{i}": build_adapter_dir(root / f"ad-{i}", tiny_model_dir, seed=i) for i in range(3)}
    for eid, d in out.items():
        with gateway.admin() as c:
            r = c.post("/admin/experts", json={"id": eid, "path": str(d), "base": "tiny", "tags": ["pool"]})
            assert r.status_code == 201, r.text
    out["wide-base"] = build_model_dir(root / "wide", tokenizer=tokenizer, n_embd=96)
    return out


def complete(gateway, model: str) -> str:
    r = httpx.post(gateway.base + "/v1/completions", headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                   json={"model": model, "prompt": "def", "max_tokens": 6, "temperature": 0, "logprobs": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_adapter_is_registered_and_served_as_base_plus_adapter(gateway, adapters, tiny_model_dir):
    with gateway.admin() as c:
        e = c.get("/admin/experts/ad-0").json()
    assert e["kind"] == "lora" and e["spec"]["base"] == "tiny" and e["spec"]["rank"] == 4
    assert e["spec"]["target_modules"] == ["c_attn"]
    served = complete(gateway, "ad-0")
    # Reference: peft applied directly to the base.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapters["ad-0"]).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("def", return_tensors="pt").input_ids
    with torch.no_grad():
        first = int(model(ids).logits[0, -1].argmax())
    assert served["logprobs"]["tokens"][0] == tok.decode([first])
    assert served["text"] != complete(gateway, "tiny")["text"]  # the adapter changes the output


def test_adapter_refusals(gateway, adapters, tiny_model_dir, tmp_path):
    with gateway.admin() as c:
        r = c.post("/admin/experts", json={"id": "no-base", "path": str(adapters["ad-1"])})
        assert r.status_code == 400 and "base" in r.json()["error"]["message"]
        r = c.post("/admin/experts", json={"id": "bad-base", "path": str(adapters["ad-1"]), "base": "ghost"})
        assert r.status_code == 404
        wide = tmp_path / "wide-ad"
        build_adapter_dir(wide, adapters["wide-base"])
        r = c.post("/admin/experts", json={"id": "misfit", "path": str(wide), "base": "tiny"})
        assert r.status_code == 400 and "does not fit" in r.json()["error"]["message"]
        assert c.delete("/admin/experts/tiny").status_code == 409  # adapters depend on it
        assert c.get("/admin/experts/misfit").status_code == 404


def test_lora_merges_register_adapters(gateway, adapters):
    recipe = {"method": "evo", "base": "tiny", "experts": [{"id": "ad-0", "alpha": 0.5, "beta": 0.7},
                                                            {"id": "ad-1", "alpha": 1.0, "beta": -0.3}]}
    with gateway.admin() as c:
        r = c.post("/admin/merges", params={"background": "false"}, json={"id": "ad-evo", "recipe": recipe})
        assert r.status_code == 201, r.text
        e = r.json()
        assert e["kind"] == "lora" and e["spec"]["base"] == "tiny" and e["lineage"]["recipe"]["method"] == "evo"
        r = c.post("/admin/merges", params={"background": "false"},
                   json={"id": "ad-lin", "recipe": {"method": "linear", "experts": [{"id": "ad-0", "weight": 0.5},
                                                                                     {"id": "ad-2", "weight": 0.5}]}})
        assert r.status_code == 201, r.text
        r = c.post("/admin/merges", json={"id": "mixed", "recipe": {"method": "linear", "experts": [
            {"id": "ad-0"}, {"id": "tiny"}]}})
        assert r.status_code == 400
    assert complete(gateway, "ad-evo")["finish_reason"] in ("stop", "length")
    assert complete(gateway, "ad-lin")["finish_reason"] in ("stop", "length")
