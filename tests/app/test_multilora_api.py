"""Adapters served on their resident base; request-time mixes answer like the same mix merged by
/admin/merges; bad mixes are refused."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.helpers import ADMIN_KEY, CLIENT_KEY, build_adapter_dir

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


@pytest.fixture(scope="module")
def lmpool(gateway, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lmpool")
    ids = []
    for i in range(3):
        d = build_adapter_dir(root / f"lm-{i}", tiny_model_dir, rank=4, seed=10 + i, targets=("c_attn", "c_fc"))
        with gateway.admin() as c:
            r = c.post("/admin/experts", json={"id": f"lm-{i}", "path": str(d), "base": "tiny"})
            assert r.status_code == 201, r.text
        ids.append(f"lm-{i}")
    return ids


def complete(gateway, model: str, **extra) -> dict:
    r = httpx.post(gateway.base + "/v1/completions", headers=AUTH, timeout=60,
                   json={"model": model, "prompt": "def read(path):", "max_tokens": 10, "temperature": 0,
                         "logprobs": 1, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def materialise(gateway, name: str, recipe: dict) -> None:
    with gateway.admin() as c:
        r = c.post("/admin/merges?background=false", json={"id": name, "recipe": recipe})
        assert r.status_code == 201, r.text


@pytest.mark.parametrize("method,experts,compact", [
    ("linear", [{"id": "lm-0", "weight": 0.7}, {"id": "lm-1", "weight": 0.3}], "tiny@linear:lm-0*0.7,lm-1*0.3"),
    ("cat", [{"id": "lm-0", "weight": 1.0}, {"id": "lm-2", "weight": 0.5}], "tiny@cat:lm-0*1.0,lm-2*0.5"),
    ("evo", [{"id": "lm-0", "alpha": 0.5, "beta": 0.9}, {"id": "lm-1", "alpha": 1.0, "beta": -0.4}],
     "tiny@evo:lm-0*0.5/0.9,lm-1*1.0/-0.4"),
])
def test_a_request_time_mix_answers_like_the_materialised_merge(gateway, lmpool, method, experts, compact):
    recipe = {"method": method, "experts": experts, **({"base": "tiny"} if method == "evo" else {})}
    materialise(gateway, f"lmerged-{method}", recipe)
    want = complete(gateway, f"lmerged-{method}")["choices"][0]
    by_body = complete(gateway, "tiny", adapters={"method": method, "experts": experts})["choices"][0]
    by_id = complete(gateway, compact)["choices"][0]
    assert by_body["text"] == want["text"] == by_id["text"]
    for a, b in zip(want["logprobs"]["token_logprobs"], by_body["logprobs"]["token_logprobs"], strict=True):
        assert abs(a - b) < 1e-5
    assert by_body["text"] != complete(gateway, "tiny")["choices"][0]["text"]  # the mix changes the answer


def test_the_openai_client_sends_a_mix_with_extra_body(gateway, lmpool):
    client = openai.OpenAI(base_url=gateway.base + "/v1", api_key=CLIENT_KEY)
    r = client.completions.create(model="tiny", prompt="def read(path):", max_tokens=10, temperature=0,
                                  extra_body={"adapters": {"experts": [{"id": "lm-1"}]}})
    assert r.choices[0].text == complete(gateway, "lm-1")["choices"][0]["text"]


def test_requests_for_many_adapters_share_the_base_and_equal_each_alone(gateway, lmpool):
    models = ["tiny", *lmpool, "tiny@linear:lm-0*0.5,lm-2*0.5"] * 3
    alone = [complete(gateway, m)["choices"][0]["text"] for m in models]

    async def together() -> list[str]:
        async with httpx.AsyncClient(base_url=gateway.base, headers=AUTH, timeout=60) as c:
            rs = await asyncio.gather(*(c.post("/v1/completions", json={
                "model": m, "prompt": "def read(path):", "max_tokens": 10, "temperature": 0}) for m in models))
        return [r.json()["choices"][0]["text"] for r in rs]

    assert asyncio.run(together()) == alone
    with gateway.admin() as c:
        experts = {e["id"]: e for e in c.get("/admin/experts").json()["data"]}
    assert experts["lm-0"]["loaded"] is True  # served: its base is resident...
    metrics = httpx.get(gateway.base + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    assert "mergegate_adapter_cache_bytes" in metrics


@pytest.mark.parametrize("model,extra,status,words", [
    ("tiny@linear:ghost*1", {}, 404, "ghost"),
    ("tiny@bogus:lm-0*1", {}, 400, "method"),
    ("tiny@evo:lm-0*2/1", {}, 400, "alpha"),
    ("tiny@linear:lm-0*x", {}, 400, "not a number"),
    ("tiny@linear:tiny*1", {}, 400, "LoRA"),
    ("tiny", {"adapters": {"method": "evo", "experts": [{"id": "lm-0", "alpha": 0.5, "beta": 9}]}}, 400, "beta"),
    ("tiny", {"adapters": {"experts": []}}, 400, "experts"),
])
def test_bad_mixes_are_refused(gateway, lmpool, model, extra, status, words):
    r = httpx.post(gateway.base + "/v1/completions", headers=AUTH, timeout=60,
                   json={"model": model, "prompt": "x", "max_tokens": 2, **extra})
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["error"]["message"].lower()
