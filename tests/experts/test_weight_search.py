"""experts/blackbox/weight_search.py: objectives by hand, the search, and `collect` against real members.

The real ensemble has a remote member (the shared gateway's `tiny`, reached over HTTP as `up`) and a
local member (`loc`, another tiny GPT-2 with the same tokenizer, loaded in this process). The served
ensemble refuses echo, so the token_mix check computes the mixture from each member asked directly.
"""

from __future__ import annotations

import asyncio
import math
import random

import anyio
import httpx
import numpy as np
import pytest
import torch

from experts.base import GenerationParams
from experts.blackbox import BlackBoxEnsemble, BlackBoxSpec, MemberSpec, select, weighted_score
from experts.blackbox.members import Candidate
from experts.blackbox.weight_search import (
    EnsembleWeightsEvaluator,
    ScoreTable,
    SelectRow,
    TokenRow,
    WeightSearchInputError,
    collect,
    new_weights,
    ordered_weights,
    search_ensemble_weights,
    token_f1,
)
from experts.hf.loading import ModelCache, load_hf_model
from experts.hf.local import LocalExpert
from experts.remote.expert import RemoteExpert
from experts.remote.secrets import SecretStore
from experts.remote.upstream import RemoteRuntime
from experts.repository.registry import ExpertRecord
from tests.helpers import CLIENT_KEY

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ln = math.log


def tokens_table(rows: list[list[tuple[float, float]]], weights=(0.5, 0.5)) -> ScoreTable:
    """rows of (p_a, p_b) per reference token, as probabilities."""
    out = tuple(TokenRow("", "x", tuple(tuple(ln(t[j]) for t in row) for j in range(2))) for row in rows)
    return ScoreTable("ens", "token_mix", ("a", "b"), weights, "loss", out)


# -- objectives by hand ---------------------------------------------------------------------------------
def test_token_mix_loss_by_hand():
    ev = EnsembleWeightsEvaluator(tokens_table([[(0.5, 0.1), (0.25, 0.5)], [(0.8, 0.2)]]))
    assert ev.n == 2
    # beta (1, 3) -> w = (0.25, 0.75): mixtures 0.2, 0.4375, 0.35, pooled over the 3 tokens
    assert ev.evaluate([1.0, 1.0], [1.0, 3.0]) == pytest.approx(-(ln(0.2) + ln(0.4375) + ln(0.35)) / 3, rel=1e-12)
    assert ev.loss([0.2, 0.0]) == pytest.approx(-(ln(0.5) + ln(0.25) + ln(0.8)) / 3, rel=1e-12)
    assert ev.loss([0.0, 0.0]) == math.inf and ev.loss([1.0, -0.1]) == math.inf
    assert ev.loss([0.0, 1.0]) == pytest.approx(-(ln(0.1) + ln(0.5) + ln(0.2)) / 3, rel=1e-12)
    # a token one member gives probability 0: finite as long as the other has a weight
    ev = EnsembleWeightsEvaluator(ScoreTable("e", "token_mix", ("a", "b"), (0.5, 0.5), "loss",
                                             (TokenRow("", "x", ((-math.inf,), (ln(0.4),))),)))
    assert ev.loss([1, 1]) == pytest.approx(-ln(0.2)) and ev.loss([1, 0]) == math.inf
    with pytest.raises(WeightSearchInputError):
        EnsembleWeightsEvaluator(ev.table, "accuracy")


def select_table() -> ScoreTable:
    rows = (
        # l_a, l_b per candidate; S(yes) > S(no) iff w_a > 0.75
        SelectRow("q1", "yes", ("a", "b"), ("yes", "no"), ((-1.0, -2.0), (-1.5, -0.5)), (-1.0, -2.0)),
        # b cannot score "the cat"; nobody scores the empty answer
        SelectRow("q2", "the cat sat", ("a", "b"), ("the cat", ""), ((-0.2, None), (None, None)), (-3.0, -1.0)),
    )
    return ScoreTable("ens", "score_select", ("a", "b"), (0.5, 0.5), "accuracy", rows)


def test_score_select_objectives_by_hand():
    table = select_table()
    acc, f1, loss = (EnsembleWeightsEvaluator(table, o) for o in ("accuracy", "f1", "loss"))
    assert acc.selected([0.5, 0.5]) == [1, 0] and acc.selected([0.8, 0.2]) == [0, 0]
    assert acc.selected([0.0, 1.0]) == [1, 0]  # q2: every S is -inf, the first candidate is taken
    assert token_f1("the cat", "the cat sat") == pytest.approx(0.8) and token_f1("", "") == 1.0
    assert acc.loss([0.5, 0.5]) == 1.0 and acc.loss([0.8, 0.2]) == 0.5 and acc.loss([4, 1]) == 0.5
    assert f1.loss([0.5, 0.5]) == pytest.approx(1 - (0 + 0.8) / 2) and f1.loss([0.8, 0.2]) == pytest.approx(0.1)

    def soft(x: float) -> float:  # -log(e^ref / (e^ref + e^wrong)) = soft(wrong - ref)
        return ln(1 + math.exp(x))

    assert loss.loss([1, 1]) == pytest.approx((soft(-1.0 + 1.5) + soft(-0.2 + 2.0)) / 2, rel=1e-12)
    assert loss.loss([1, 0]) == pytest.approx((soft(-1.5 + 1.0) + soft(-0.2 + 3.0)) / 2, rel=1e-12)
    assert loss.loss([0, 1]) == pytest.approx((soft(-0.5 + 2.0) + 0.0) / 2, rel=1e-12)  # "the cat": -inf
    assert loss.loss([0, 0]) == math.inf and acc.evaluate([1, 1], [0.8, 0.2]) == 0.5


def test_selection_is_the_ensembles_rule():
    rng = random.Random(0)
    rows = tuple(SelectRow("p", "r", ("a", "b", "c"), tuple(f"t{j}" for j in range(3)),
                           tuple(tuple(None if rng.random() < 0.2 else -rng.random() * 3 for _ in range(3))
                                 for _ in range(3)), (-1.0, -1.0, -1.0)) for _ in range(30))
    ev = EnsembleWeightsEvaluator(ScoreTable("e", "score_select", ("a", "b", "c"), (1 / 3,) * 3, "accuracy", rows))
    for _ in range(20):
        w = [rng.choice([0.0, rng.random()]) for _ in range(3)]
        if sum(w) == 0:
            continue
        ws = dict(zip("abc", (v / sum(w) for v in w)))
        want = [select([weighted_score(dict(zip("abc", s)), ws) for s in r.scores]) for r in rows]
        assert ev.selected(w) == want


# -- the search -------------------------------------------------------------------------------------------
def test_search_favours_the_better_member():
    rng = np.random.default_rng(0)
    rows = [[(float(rng.uniform(0.3, 0.9)), float(rng.uniform(0.01, 0.1))) for _ in range(5)] for _ in range(4)]
    table = tokens_table(rows)
    r = search_ensemble_weights(table, budget=80, seed=0)
    w = new_weights(r, table)
    assert w["a"] > 0.9 and sum(w.values()) == pytest.approx(1) and r.method == "ensemble_weights"
    assert r.loss < r.settings["baseline_loss"]["uniform"] and r.settings["objective"] == "loss"
    assert r.settings["table"]["tokens"] == 20
    again = search_ensemble_weights(table, budget=80, seed=0)
    assert again.beta == r.beta


@pytest.mark.parametrize("objective", ["accuracy", "loss"])
def test_search_on_score_select(objective):
    # a ranks the right answer first, b the wrong one: right wins iff w_a > 2/3
    rows = tuple(SelectRow(f"q{i}", f"right {i}", ("a", "b"), (f"right {i}", f"wrong {i}"),
                           ((-1.0, -3.0), (-2.0, -1.0)), (-1.0, -3.0)) for i in range(5))
    table = ScoreTable("ens", "score_select", ("a", "b"), (0.5, 0.5), "accuracy", rows)
    r = search_ensemble_weights(table, objective=objective, budget=60, seed=1)
    assert new_weights(r, table)["a"] > 2 / 3
    assert EnsembleWeightsEvaluator(table, "accuracy").loss(r.beta) == 0.0
    assert r.settings["baseline_loss"]["current"] == r.settings["baseline_loss"]["uniform"] > r.loss


def test_weights_for_the_spec():
    spec = BlackBoxSpec("token_mix", (MemberSpec("b", 0.5), MemberSpec("a", 0.5)), ("b", "a"))
    assert ordered_weights(spec, {"a": 0.9, "b": 0.1}) == [0.1, 0.9]
    with pytest.raises(WeightSearchInputError):
        ordered_weights(spec, {"a": 1.0})


# -- collect with fake members: which calls, how many at once ---------------------------------------------
class FakeMember:
    remote = False

    def __init__(self, mid: str, weight: float, answers: dict[str, str], state: dict) -> None:
        self.id, self.weight, self.answers, self.state = mid, weight, answers, state

    async def _call(self, kind: str, ledger) -> None:
        self.state["now"] += 1
        self.state["peak"] = max(self.state["peak"], self.state["now"])
        await anyio.sleep(0.002)
        self.state["now"] -= 1
        self.state["calls"].append((self.id, kind))
        ledger.add(self.id)

    async def generate(self, prompt, params, body, ledger) -> Candidate:
        assert params.temperature == 0 and body == {"prompt": prompt, "max_tokens": 3, "temperature": 0}
        await self._call("generate", ledger)
        return Candidate(self.id, self.answers[prompt], "stop", 1, 1)

    async def score(self, prompt, text, ledger) -> list[float]:
        await self._call("score", ledger)
        return [-1.0 if self.id == "a" else -2.0] * len(text.split())


class FakeEnsemble:
    def __init__(self, mode: str, candidates: tuple[str, ...] = ("a", "b")) -> None:
        self.state = {"now": 0, "peak": 0, "calls": []}
        answers = {"a": {"p1": "x", "p2": "same"}, "b": {"p1": "", "p2": "same"}}
        self.members = [FakeMember(m, 0.5, answers[m], self.state) for m in ("a", "b")]
        self.spec = BlackBoxSpec(mode, tuple(MemberSpec(m.id, 0.5) for m in self.members), candidates)
        self.mode, self.id = mode, "fake"

    def member(self, mid: str) -> FakeMember:
        return next(m for m in self.members if m.id == mid)


def test_collect_makes_each_call_once_with_bounded_concurrency():
    ens = FakeEnsemble("score_select")
    examples = [{"prompt": "p1", "completion": "x"}, {"prompt": "p2", "completion": "ref"}]
    table = asyncio.run(collect(ens, examples, max_tokens=3, concurrency=2))
    # p1: texts {"x"} ("" is not scored; the reference is "x"); p2: {"same", "ref"}
    assert table.calls == 2 * 2 + 2 * (1 + 2) == len(ens.state["calls"]) and ens.state["peak"] == 2
    assert table.usage["members"]["a"]["calls"] == 5
    r1, r2 = table.rows
    assert r1.texts == ("x", "") and r1.scores == ((-1.0, -2.0), (None, None)) and r1.reference_scores == (-1.0, -2.0)
    assert r2.generators == ("a", "b") and r2.texts == ("same", "same") and r2.scores[0] == r2.scores[1]
    assert table.objective == "accuracy" and table.settings["max_tokens"] == 3
    ens = FakeEnsemble("token_mix")
    table = asyncio.run(collect(ens, [{"text": "a b c"}, {"prompt": "p", "completion": "d e"}], concurrency=3))
    assert table.calls == 4 and [r.logprobs for r in table.rows][1] == ((-1.0, -1.0), (-2.0, -2.0))
    assert not any(kind == "generate" for _, kind in ens.state["calls"]) and ens.state["peak"] <= 3
    for bad, kw in (([{"text": "t"}], {}), ([], {}), ([{"prompt": "p", "completion": ""}], {}),
                    ([{"prompt": "p", "completion": "c"}], {"objective": "loss2"})):
        with pytest.raises(WeightSearchInputError):
            asyncio.run(collect(FakeEnsemble("score_select"), bad, **kw))


# -- collect against a real local member and a remote one (the shared gateway) ---------------------------
@pytest.fixture(scope="module")
def local_dir(tmp_path_factory, tokenizer):
    """A tiny GPT-2 with `tiny`'s tokenizer and untied output weights: random tied models greedily repeat
    the prompt's last token, so the two members would always propose the same candidate."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("weights") / "untied"
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=len(tokenizer), n_positions=128,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                     tie_word_embeddings=False)
    torch.manual_seed(1)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def real_ensemble(mode: str, gateway, local_dir, http: httpx.AsyncClient, tmp_path) -> BlackBoxEnsemble:
    secrets = SecretStore(tmp_path / "secrets")
    secrets.set("up", CLIENT_KEY)
    remote = RemoteExpert(ExpertRecord(id="up", kind="remote", spec={"base_url": gateway.base + "/v1",
                                                                     "model": "tiny"}), RemoteRuntime(http, secrets))
    cache = ModelCache(lambda _: load_hf_model(local_dir), max_models=1, max_bytes=1 << 30)
    experts = {"up": remote, "loc": LocalExpert(ExpertRecord(id="loc", kind="local"), cache)}
    spec = {"mode": mode, "members": [{"id": "up", "weight": 0.3}, {"id": "loc", "weight": 0.7}]}
    return BlackBoxEnsemble(ExpertRecord(id="ens", kind="ensemble", spec=spec), experts.__getitem__)


TEXTS = [{"prompt": "The quick brown fox", "completion": " jumps over the lazy dog"},
         {"text": "def main(): return 1"}, {"prompt": "x = ", "completion": "1 + 2"}]


def echo(gateway, prompt: str, text: str) -> list[float]:
    r = httpx.post(gateway.base + "/v1/completions", headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=60,
                   json={"model": "tiny", "prompt": prompt + text, "echo": True, "logprobs": 0, "max_tokens": 0})
    lp = r.json()["choices"][0]["logprobs"]
    ends = lp["text_offset"][1:] + [len(prompt + text)]
    return [v for v, end in zip(lp["token_logprobs"], ends) if end > len(prompt) and v is not None]


def forward(model_dir, text: str) -> list[float]:
    m = load_hf_model(model_dir)
    ids = m.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(m.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return [float(lp[i - 1, t]) for i, t in enumerate(ids) if i > 0]


def test_collect_token_mix_against_real_members(gateway, local_dir, tmp_path):
    async def main() -> ScoreTable:
        async with httpx.AsyncClient() as http:
            return await collect(real_ensemble("token_mix", gateway, local_dir, http, tmp_path), TEXTS)

    table = asyncio.run(main())
    assert table.calls == 3 * 2 and {m: u["calls"] for m, u in table.usage["members"].items()} == {"up": 3, "loc": 3}
    assert table.members == ("up", "loc") and table.weights == (0.3, 0.7)
    ev = EnsembleWeightsEvaluator(table)
    # by hand, from each member asked directly: the remote's echo logprobs, the local model's forward pass
    remote, local = [], []
    for ex in TEXTS:
        prompt, text = ex.get("prompt", ""), ex.get("completion", ex.get("text"))
        r = echo(gateway, prompt, text)
        remote += r
        local += forward(local_dir, prompt + text)[-len(r):]
    assert len(remote) == len(local) == sum(len(row.logprobs[0]) for row in table.rows)
    want = -np.mean([ln(0.3 * math.exp(a) + 0.7 * math.exp(b)) for a, b in zip(remote, local)])
    assert math.isfinite(ev.loss(table.weights)) and ev.loss(table.weights) == pytest.approx(want, abs=1e-5)
    assert ev.loss([1.0, 0.0]) == pytest.approx(-np.mean(remote), abs=1e-5)
    assert ev.loss([0.0, 1.0]) == pytest.approx(-np.mean(local), abs=1e-5)


def test_collect_score_select_against_real_members(gateway, local_dir, tmp_path):
    examples = [{"prompt": "The quick brown fox", "completion": " jumps"}, {"prompt": "def f(", "completion": "x):"}]

    async def main():
        async with httpx.AsyncClient() as http:
            ens = real_ensemble("score_select", gateway, local_dir, http, tmp_path)
            table = await collect(ens, examples, max_tokens=4)
            params = GenerationParams(max_tokens=4, temperature=0.0)
            served = [await ens.answer(ex["prompt"], params, {"prompt": ex["prompt"], "max_tokens": 4,
                                                              "temperature": 0}) for ex in examples]
            return table, served

    table, served = asyncio.run(main())
    assert any(len(set(r.texts)) == 2 for r in table.rows)  # a real choice somewhere
    distinct = [len({*r.texts, r.reference} - {""}) for r in table.rows]
    assert table.calls == 2 * 2 + 2 * sum(distinct)
    ev = EnsembleWeightsEvaluator(table)
    for objective in ("accuracy", "f1", "loss"):
        value = EnsembleWeightsEvaluator(table, objective).loss(table.weights)
        assert math.isfinite(value) and value >= 0
    # the evaluator selects what the served ensemble answers at the same weights, from the same scores
    for row, pick, end in zip(table.rows, ev.selected(table.weights), served):
        assert row.texts == tuple(c["text"] for c in end.report["candidates"])
        assert end.text == row.texts[pick] and end.report["selected"] == row.generators[pick]
        for text, scores, cand in zip(row.texts, row.scores, end.report["candidates"]):
            if text:
                want = (cand["scores"]["up"], cand["scores"]["loc"])
                assert scores == pytest.approx(want, abs=1e-5)  # float noise: batched forwards differ in low bits
