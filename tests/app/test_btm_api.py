"""BTM through the admin API: seed, train, branch, forest served as an ensemble, average, evaluate."""

from __future__ import annotations

import math

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import CLIENT_KEY

BUDGET = {"max_tokens": 8 * 64 * 20, "batch_size": 8, "seq_len": 64, "lr": 3e-3}
SIZE = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128, "vocab_size": 512}


def post(c: httpx.Client, path: str, body: dict, status: int = 201, **params) -> dict:
    r = c.post(path, json=body, params={"background": "false", **params})
    assert r.status_code == status, r.text
    return r.json()


@pytest.fixture(scope="module")
def forest(gateway):
    with gateway.admin() as c:
        post(c, "/admin/btm/seed", {"id": "b-seed", "domains": ["code", "python_docs"], "budget": BUDGET, "size": SIZE})
        post(c, "/admin/btm/train", {"id": "b-code", "source": "b-seed", "domain": "code", "budget": BUDGET})
        post(c, "/admin/btm/train", {"id": "b-docs", "source": "b-seed", "domain": "python_docs", "budget": BUDGET})
        f = post(c, "/admin/btm/forests", {"id": "b-forest", "members": ["b-code", "b-docs"],
                                           "prior": {"corpus": "code", "sequences": 4}}, params={})
    return f


def test_lineage_and_branch(gateway, forest):
    with gateway.admin() as c:
        e = c.get("/admin/experts/b-code").json()
        assert e["lineage"]["op"] == "btm.train" and e["lineage"]["parents"][0]["id"] == "b-seed"
        b = post(c, "/admin/btm/branch", {"id": "b-branch", "parents": ["b-code", "b-docs"], "domain": "code"})
        weights = [p["weight"] for p in b["lineage"]["parents"]]
        assert abs(sum(weights) - 1) < 1e-6 and weights[0] > weights[1]  # posterior on code favours b-code
    assert forest["kind"] == "ensemble" and forest["spec"]["prior"][0] > forest["spec"]["prior"][1]


def test_served_ensemble_logprobs_equal_the_mixture(gateway, forest):
    text = "def read(path):\n    return open(path).read()\n"
    r = httpx.post(gateway.base + "/v1/completions", headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                   json={"model": "b-forest", "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    served = r.json()["choices"][0]["logprobs"]["token_logprobs"][1:]
    # The mixture computed directly (BTM §2, paper form): w_j(t) ∝ prior_j · Π_{s<t} p_j(x_s | x_<s).
    with httpx.Client(base_url=gateway.base, headers=gateway.admin_headers) as c:
        paths = [gateway.data_dir / c.get(f"/admin/experts/{m}").json()["path"] for m in ("b-code", "b-docs")]
    tok = AutoTokenizer.from_pretrained(paths[0])
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        lps = [torch.log_softmax(AutoModelForCausalLM.from_pretrained(p)(ids).logits[0].float(), -1) for p in paths]
    tgt = ids[0, 1:]
    per_tok = torch.stack([lp[:-1].gather(1, tgt[:, None]).squeeze(1) for lp in lps])  # [k, T-1]
    log_prior = torch.log(torch.tensor(forest["spec"]["prior"]))
    ctx = torch.cat([torch.zeros(2, 1), per_tok.cumsum(1)[:, :-1]], dim=1)  # log-likelihood of x_<t
    logw = torch.log_softmax(log_prior[:, None] + ctx, dim=0)
    direct = torch.logsumexp(logw + per_tok, dim=0)
    assert served == pytest.approx(direct.tolist(), abs=2e-4)


def test_ensemble_streams_and_chats(gateway, forest):
    import openai

    client = openai.OpenAI(base_url=gateway.base + "/v1", api_key=CLIENT_KEY, max_retries=0)
    chunks = list(client.completions.create(model="b-forest", prompt="import ", max_tokens=6, seed=1, stream=True,
                                            stream_options={"include_usage": True}))
    whole = client.completions.create(model="b-forest", prompt="import ", max_tokens=6, seed=1)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_average_and_evaluate(gateway, forest):
    with gateway.admin() as c:
        avg = post(c, "/admin/btm/forests/b-forest/average", {"id": "b-avg", "weighting": "prior"})
        assert avg["lineage"]["op"] == "btm.average.prior"
        results = {}
        for model in ("b-seed", "b-code", "b-forest", "b-avg"):
            job = post(c, "/admin/evaluate", {"model": model, "corpus": "code", "split": "test", "max_tokens": 3000,
                                              "context_length": 64, "stride": 32}, status=200)
            res = job["result"]
            assert res["tokens"] == 2999 and res["bits_per_byte"] > 0
            assert math.isclose(res["perplexity"], math.exp(res["loss"]), rel_tol=1e-6)
            results[model] = res["bits_per_byte"]
    assert results["b-code"] < results["b-seed"]  # the code expert is better on code than the seed


def test_corpus_upload_and_bad_input(gateway, forest):
    with gateway.admin() as c:
        text = "\n\n".join(f"Recipe {i}: mix flour and water, bake for {i} minutes." for i in range(60))
        r = c.post("/admin/corpora", data={"name": "recipes", "format": "text"}, files={"file": ("r.txt", text)})
        assert r.status_code == 201, r.text
        assert "recipes" in [x["name"] for x in c.get("/admin/corpora").json()["built"]]
        bad = [
            (c.post("/admin/corpora", data={"name": "latin1"},
                    files={"file": ("x", "caf\xe9".encode("latin-1"))}), 400),
            (c.post("/admin/corpora", data={"name": "empty"}, files={"file": ("x", b"")}), 400),
            (c.post("/admin/btm/train",
                    json={"id": "x1", "source": "b-seed", "domain": "klingon", "budget": BUDGET}), 400),
            (c.post("/admin/btm/train", json={"id": "x2", "source": "b-seed", "domain": "code",
                                              "budget": {"max_tokens": 0}}), 400),
            (c.post("/admin/btm/train", json={"id": "x3", "source": "b-seed", "domain": "code", "budget": {}}), 400),
            (c.post("/admin/btm/train", json={"id": "x4", "source": "ghost", "domain": "code", "budget": BUDGET}), 404),
            (c.post("/admin/btm/seed", json={"id": "b-seed", "domains": ["code"], "budget": BUDGET}), 409),
            (c.post("/admin/evaluate", json={"model": "b-seed"}), 400),
        ]
        for resp, status in bad:
            assert resp.status_code == status, resp.text
            assert resp.json()["error"]["message"]
        for i in ("x1", "x2", "x3", "x4"):
            assert c.get(f"/admin/experts/{i}").status_code == 404


def test_paper_protocol_options(gateway, forest):
    assert forest["spec"]["prior_source"] == {"corpus": "code", "split": "validation", "sequences": 4,
                                              "kind": "estimated"}
    with gateway.admin() as c:
        r = post(c, "/admin/btm/train", {"id": "b-resumed", "source": "b-seed", "domain": "code", "resume": True,
                                         "budget": {**BUDGET, "max_tokens": 4 * 64 * 5, "batch_size": 4}})
        assert r["lineage"]["train"]["resumed"] and r["lineage"]["train"]["start_step"] == 20
        bad = c.post("/admin/btm/pipeline", params={"background": "false"},
                     json={"prefix": "pp", "domains": ["code", "python_docs", "legal"], "budget": BUDGET,
                           "branch_from": "seed", "batch_split": "paper"})
        assert bad.status_code == 400 and "multiple of 3" in bad.json()["error"]["message"]
        assert c.post("/admin/btm/pipeline", json={"prefix": "pq", "domains": ["code"], "budget": BUDGET,
                                                   "branch_from": "nowhere"}).status_code in (400, 422)
        bad = c.post("/admin/btm/train", json={"id": "b-nostate", "source": "b-code", "domain": "code",
                                               "resume": True, "budget": BUDGET}, params={"background": "false"})
        assert bad.status_code == 400 and "optimizer state" in bad.json()["error"]["message"]
