"""/v1/merge/sessions over HTTP: the black-box contract (loss only, = the materialised expert's loss, budget,
400s, batches, concurrency, bases, delete) and /admin/loras/train."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import CLIENT_KEY, build_adapter_dir, build_model_dir

CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}
EXAMPLES = [
    {"prompt": "def add(a, b):\n", "completion": "    return a + b"},
    {"prompt": "Lists are", "completion": " mutable sequences, typically used to store collections of items."},
    {"text": "The with statement is used to wrap the execution of a block with methods defined by a context manager."},
    {"prompt": "A tuple", "completion": " is an immutable sequence."},
]
IDS = [f"ms-ad-{i}" for i in range(4)]


@pytest.fixture(scope="module")
def pool(gateway, tiny_model_dir, tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("ms-adapters")
    with gateway.admin() as c:
        for i, eid in enumerate(IDS):
            d = build_adapter_dir(root / eid, tiny_model_dir, seed=10 + i)
            r = c.post("/admin/experts", json={"id": eid, "path": str(d), "base": "tiny", "tags": ["ms-pool"]})
            assert r.status_code == 201, r.text
        other = build_model_dir(root / "tiny-b", tokenizer=tokenizer, seed=3)
        assert c.post("/admin/experts", json={"id": "ms-tiny-b", "path": str(other)}).status_code == 201
        r = c.post("/admin/experts", json={"id": "ms-other-ad", "path": str(build_adapter_dir(root / "oad", other)),
                                           "base": "ms-tiny-b"})
        assert r.status_code == 201, r.text
    return IDS


def api(gateway) -> httpx.Client:
    return httpx.Client(base_url=gateway.base + "/v1/merge", headers=CLIENT, timeout=120)


def create(c: httpx.Client, **extra) -> dict:
    body = {"base": "tiny", "pool": {"tags": ["ms-pool"]}, "validation": {"examples": EXAMPLES}, **extra}
    r = c.post("/sessions", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def candidates(n: int, k: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"alpha": torch.rand(n, generator=g).tolist(), "beta": (torch.rand(n, generator=g) * 2 - 1).tolist()}
            for _ in range(k)]


def direct_loss(model, tok) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for e in EXAMPLES:
            if "text" in e:
                ids, first = tok(e["text"])["input_ids"], 1
            else:
                p = tok(e["prompt"])["input_ids"]
                ids, first = p + tok(e["completion"])["input_ids"], len(p)
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0]
            total += F.cross_entropy(logits[first - 1:-1], x[0, first:], reduction="sum").item()
            n += len(ids) - first
    return total / n


def test_evaluate_returns_only_a_loss_equal_to_the_materialised_expert(gateway, pool, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with api(gateway) as c:
        s = create(c, budget=50)
        assert s["object"] == "merge.session" and s["n"] == 4 and s["experts"] == IDS
        assert s["budget"] == 50 and s["used"] == 0 and s["validation"]["examples"] == len(EXAMPLES)
        cand = {"alpha": [1.0, 0.5, 0.8, 0.2], "beta": [0.6, -0.4, 0.3, 0.9]}
        r = c.post(f"/sessions/{s['id']}/evaluate", json=cand)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"loss", "queries_used", "queries_left"}
        assert body["queries_used"] == 1 and body["queries_left"] == 49
        r = c.post(f"/sessions/{s['id']}/materialize", json={**cand, "name": "ms-merged", "tags": ["evo"]},
                   headers=gateway.admin_headers)  # registering an expert is an admin right
        assert r.status_code == 201, r.text
        e = r.json()
    assert e["kind"] == "lora" and e["spec"]["base"] == "tiny" and e["lineage"]["recipe"]["method"] == "evo"
    assert [x["alpha"] for x in e["lineage"]["recipe"]["experts"]] == cand["alpha"]
    assert [x["beta"] for x in e["lineage"]["recipe"]["experts"]] == cand["beta"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      gateway.data_dir / e["path"]).eval()
    assert abs(body["loss"] - direct_loss(model, AutoTokenizer.from_pretrained(tiny_model_dir))) < 1e-4
    r = httpx.post(gateway.base + "/v1/completions", headers=CLIENT,
                   json={"model": "ms-merged", "prompt": "def", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text  # the materialised merge is servable


def test_batch_equals_single_and_concurrent_equals_sequential(gateway, pool):
    cands = candidates(4, 6, seed=0)
    with api(gateway) as c:
        sid = create(c)["id"]
        single = [c.post(f"/sessions/{sid}/evaluate", json=x).json()["loss"] for x in cands]
        r = c.post(f"/sessions/{sid}/evaluate_batch", json={"candidates": cands})
        assert r.status_code == 200, r.text
        assert r.json()["losses"] == pytest.approx(single, abs=1e-6) and r.json()["queries_used"] == 12
        with ThreadPoolExecutor(6) as ex:
            concurrent = list(ex.map(lambda x: c.post(f"/sessions/{sid}/evaluate", json=x).json()["loss"], cands))
        assert concurrent == pytest.approx(single, abs=1e-6)
        assert c.get(f"/sessions/{sid}").json()["used"] == 18


def test_budget_is_enforced_with_429(gateway, pool):
    with api(gateway) as c:
        sid = create(c, budget=3)["id"]
        cands = candidates(4, 3, seed=1)
        assert c.post(f"/sessions/{sid}/evaluate_batch", json={"candidates": cands[:2]}).status_code == 200
        r = c.post(f"/sessions/{sid}/evaluate_batch", json={"candidates": cands[:2]})  # 1 left, 2 asked
        assert r.status_code == 429 and r.headers["x-should-retry"] == "false"  # permanent: no client retries
        err = r.json()["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == "query_budget_exhausted"
        assert c.get(f"/sessions/{sid}").json()["used"] == 2  # nothing else changed
        assert c.post(f"/sessions/{sid}/evaluate", json=cands[2]).status_code == 200
        r = c.post(f"/sessions/{sid}/evaluate", json=cands[0])
        assert r.status_code == 429 and r.json()["error"]["code"] == "query_budget_exhausted"
        view = c.get(f"/sessions/{sid}").json()
        assert view["used"] == 3 and view["remaining"] == 0


def test_bad_vectors_are_400(gateway, pool):
    with api(gateway) as c:
        sid = create(c)["id"]
        ok = [1.0, 1.0, 1.0, 1.0]
        for body, param in (({"alpha": [1.0, 1.0], "beta": ok}, "alpha"),
                            ({"alpha": [1.0, 1.0, 1.2, 1.0], "beta": ok}, "alpha"),
                            ({"alpha": ok, "beta": [0.1, -1.6, 0.1, 0.1]}, "beta"),
                            ({"alpha": ok, "beta": [0.1, 0.1, 0.1, 0.1, 0.1]}, "beta")):
            r = c.post(f"/sessions/{sid}/evaluate", json=body)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == "invalid_candidate"
        assert c.post(f"/sessions/{sid}/evaluate", json={"alpha": ok}).status_code == 400  # beta missing
        assert c.post(f"/sessions/{sid}/evaluate", json={"alpha": ok, "beta": ["a", 1, 1, 1]}).status_code == 400
        r = c.post(f"/sessions/{sid}/evaluate_batch", json={"candidates": [{"alpha": ok, "beta": ok},
                                                                  {"alpha": ok, "beta": [2.0, 0, 0, 0]}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "candidates[1].beta"
        assert c.get(f"/sessions/{sid}").json()["used"] == 0


def test_session_refusals_delete_and_auth(gateway, pool):
    with api(gateway) as c:
        r = c.post("/sessions",
                   json={"base": "tiny", "pool": [IDS[0], "ms-other-ad"], "validation": {"examples": EXAMPLES}})
        assert r.status_code == 400 and "ms-tiny-b" in r.json()["error"]["message"]
        r = c.post("/sessions", json={"base": "tiny", "pool": [IDS[0], "ghost"], "validation": {"examples": EXAMPLES}})
        assert r.status_code == 404
        r = c.post("/sessions", json={"base": "tiny", "pool": IDS,
                                      "validation": {"examples": EXAMPLES, "task": "legal_continue"}})
        assert r.status_code == 400
        r = c.post("/sessions", json={"base": "tiny", "pool": IDS, "validation": {"task": "no-such-task"}})
        assert r.status_code == 400 and "unknown task" in r.json()["error"]["message"]
        sid = create(c, pool=IDS[:2])["id"]
        assert httpx.get(f"{gateway.base}/v1/merge/sessions/{sid}").status_code == 401  # client key required
        r = c.delete(f"/sessions/{sid}")
        assert r.status_code == 200 and r.json() == {"id": sid, "object": "merge.session", "deleted": True}
        for r in (c.get(f"/sessions/{sid}"), c.delete(f"/sessions/{sid}"),
                  c.post(f"/sessions/{sid}/evaluate", json={"alpha": [1, 1], "beta": [0, 0]})):
            assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"


def test_materialize_needs_the_admin_key_and_counts_against_the_budget(gateway, pool):
    cand = {"alpha": [1.0, 0.5, 0.8, 0.2], "beta": [0.6, -0.4, 0.3, 0.9]}
    with api(gateway) as c:
        sid = create(c, budget=2)["id"]
        url = f"/sessions/{sid}/materialize"
        r = c.post(url, json={**cand, "name": "ms-by-client"})  # a client key cannot register experts
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        assert httpx.post(f"{gateway.base}/v1/merge{url}", json={**cand, "name": "ms-by-nobody"}).status_code == 401
        assert c.get(f"/sessions/{sid}").json()["used"] == 0  # refused calls cost nothing
        assert c.post(f"/sessions/{sid}/evaluate", json=cand).status_code == 200
        r = c.post(url, json={**cand, "name": "ms-by-admin"}, headers=gateway.admin_headers)
        assert r.status_code == 201, r.text
        assert c.get(f"/sessions/{sid}").json()["used"] == 2  # the materialisation was one query
        r = c.post(url, json={**cand, "name": "ms-over-budget"}, headers=gateway.admin_headers)
        assert r.status_code == 429 and r.json()["error"]["code"] == "query_budget_exhausted"
    with gateway.admin() as a:
        for name in ("ms-by-client", "ms-by-nobody", "ms-over-budget"):
            assert a.get(f"/admin/experts/{name}").status_code == 404
        assert a.delete("/admin/experts/ms-by-admin").status_code == 200


def test_lora_training_job_lowers_the_validation_loss(gateway, pool):
    body = {"id": "ms-trained", "base": "tiny", "data": {"corpus": "legal", "part": [0, 2]},
            "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"]},
            "budget": {"max_tokens": 8 * 64 * 30, "batch_size": 8, "seq_len": 64, "lr": 0.01}, "tags": ["trained"]}
    with gateway.admin() as c:
        r = c.post("/admin/loras/train", params={"background": "false"}, json=body)
        assert r.status_code == 201, r.text
        e = r.json()
        assert c.post("/admin/loras/train", json=body).status_code == 409  # id taken, before any job
        bad = {**body, "id": "ms-bad", "data": {"corpus": "no-such-corpus"}}
        assert c.post("/admin/loras/train", json=bad).status_code == 400
    assert e["kind"] == "lora" and e["spec"]["base"] == "tiny" and e["spec"]["rank"] == 4
    lin = e["lineage"]
    assert lin["op"] == "lora.train" and lin["parents"][0]["id"] == "tiny"
    assert lin["recipe"]["data"] == {"corpus": "legal", "part": [0, 2]}
    assert lin["train"]["final_val_loss"] < lin["train"]["initial_val_loss"] - 0.02
