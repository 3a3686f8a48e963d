"""The BTM protocol (spec §1.2-1.4, §2.3): the budget split, the seed's resumable state, and a tiny pipeline run
whose first-round experts start from the seed's exact weights and optimizer state, with dev-data posteriors
for domains added later."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import experts.btm.operations as operations
from experts.btm.forest import create_forest
from experts.btm.mixture import estimate_prior
from experts.btm.operations import BTM, ModelSize
from experts.btm.pipeline import run_pipeline
from experts.btm.protocol import dev_sequences, load_trainer_state, plan_budget, prior_from_logliks
from experts.errors import InvalidExpertError
from experts.runtime import open_repository
from experts.training.config import TrainConfig
from experts.training.lm import new_gpt2, train_causal_lm

SIZE = ModelSize(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=512)
DENSE = TrainConfig(max_tokens=8 * 64 * 12, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=2)


def test_plan_gives_experts_the_dense_second_half_at_a_quarter_of_the_batch():
    p = plan_budget(DENSE, 4)
    assert (p.total_steps, p.seed_steps) == (12, 6)
    assert p.seed.max_tokens == 6 * 8 * 64 and p.seed.schedule_span == (0.0, 0.5) and p.seed.start_step == 0
    assert p.dense_rest.max_tokens == 6 * 8 * 64 and p.dense_rest.start_step == 6
    e = p.expert
    assert e.batch_size == 2 and e.max_tokens == 6 * 2 * 64 and e.start_step == 6 and e.schedule_span == (0.5, 1.0)
    assert p.seed.max_tokens + 4 * e.max_tokens == DENSE.max_tokens  # compute-matched with the dense model
    full = plan_budget(DENSE, 4, batch_split="full").expert
    assert full.batch_size == 8 and full.max_tokens == 2 * 8 * 64  # ceil(6 / 4) updates at the full batch
    with pytest.raises(ValueError, match="multiple of 3"):
        plan_budget(DENSE, 3)
    timed = plan_budget(TrainConfig(max_seconds=100, batch_size=8), 2)
    assert timed.seed.max_seconds == 50 and timed.expert.max_seconds == 25 and timed.expert.batch_size == 4


def test_seed_then_expert_follow_the_dense_schedule():
    p = plan_budget(DENSE, 2)
    N, S = p.total_steps, p.seed_steps
    seed = [p.seed.run_lr(i, i / S) for i in range(S)]
    expert = [p.expert.run_lr(j, j / (N - S)) for j in range(N - S)]
    dense = [DENSE.lr_at(g, g / N) for g in range(N)]
    assert seed + expert == pytest.approx(dense)


def test_resumed_optimizer_counts_on():
    model = new_gpt2(64, n_layer=1, n_embd=16, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 64, (2000,), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(max_tokens=4 * 16 * 3, batch_size=4, seq_len=16, bf16=False)
    first = train_causal_lm(model, ids, None, cfg)
    saved = {k: v.clone() for k, v in first.optimizer_state["state"][0].items()}
    second = train_causal_lm(model, ids, None, cfg, optimizer_state=first.optimizer_state)
    assert float(second.optimizer_state["state"][0]["step"]) == 6
    for k, v in saved.items():  # the saved state was copied, not trained in place
        torch.testing.assert_close(first.optimizer_state["state"][0][k], v)


def test_prior_from_logliks_equals_estimate_prior():
    models = [new_gpt2(64, n_layer=1, n_embd=16, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0, seed=s)
              for s in range(3)]
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 64, (20,), generator=g).tolist() for _ in range(7)]
    ll = torch.zeros(len(seqs), 3)
    with torch.no_grad():
        for j, m in enumerate(models):
            for i, s in enumerate(seqs):
                x = torch.tensor([s])
                lp = torch.log_softmax(m(input_ids=x).logits[0, :-1].double(), -1)
                ll[i, j] = lp.gather(1, x[0, 1:, None]).sum()
    torch.testing.assert_close(prior_from_logliks(ll), estimate_prior(models, seqs).double(), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny paper-protocol pipeline over two domains, recording every training call's starting point."""
    data = tmp_path_factory.mktemp("btm-protocol")
    repo = open_repository(data, database_url=f"sqlite:///{data / 'r.db'}", max_loaded_models=8,
                           max_loaded_bytes=1 << 30)
    btm = BTM(repo, data, corpus_bytes=700_000)
    calls = []
    real = operations.train_causal_lm

    def spy(model, train_ids, val_ids, config, **kw):
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        result = real(model, train_ids, val_ids, config, **kw)
        calls.append({"start": start, "config": config, "optimizer_state": kw.get("optimizer_state"),
                      "steps": result.steps})
        return result

    operations.train_causal_lm = spy
    try:
        out = run_pipeline(btm, "p", ["code", "python_docs"], DENSE, size=SIZE, averages=False)
    finally:
        operations.train_causal_lm = real
    yield btm, out, calls
    repo.close()


def test_round_one_experts_resume_the_exact_seed(run):
    btm, out, calls = run
    seed_dir = btm.repo.artifact_dir(btm.repo.record(out["seed"]))
    seed_weights = load_file(seed_dir / "model.safetensors")
    opt, state = load_trainer_state(seed_dir)
    assert opt is not None and state["step"] == 6 and state["schedule_position"] == 0.5
    seed_call, expert_calls = calls[0], calls[1:]
    assert seed_call["config"].batch_size == 8 and seed_call["steps"] == 6 and seed_call["optimizer_state"] is None
    assert len(expert_calls) == 2
    for call in expert_calls:
        for k, v in seed_weights.items():  # an exact copy of the seed, not of an expert trained before it
            assert torch.equal(call["start"][k], v), k
        for i, st in opt["state"].items():  # the seed's AdamW moments and step counts
            for name, value in st.items():
                assert torch.equal(call["optimizer_state"]["state"][i][name], value)
        c = call["config"]
        assert (c.batch_size, c.start_step, c.schedule_span, call["steps"]) == (4, 6, (0.5, 1.0), 6)
    for e in out["experts"]:
        rec = btm.repo.record(e)
        assert rec.lineage["parents"] == [{"id": out["seed"], "weight": 1.0}]
        assert rec.lineage["train"]["resumed"] and rec.lineage["train"]["steps"] == 6
    assert btm.repo.record(out["forest"]).spec["prior_source"] == {"kind": "uniform"}


def test_later_domain_branches_from_the_dev_posterior(run):
    btm, out, _ = run
    rec = btm.branch("p-jargon-init", out["experts"], "jargon")
    src = rec.lineage["weights_source"]
    assert src == {"kind": "estimated", "corpus": "jargon", "split": "validation", "sequences": 100}
    tok = btm.repo.cache.get(out["seed"]).tokenizer
    dev = dev_sequences(btm.token_ids(tok, "jargon", "validation"), 100, 128)
    models = [btm.repo.cache.get(e).model for e in out["experts"]]
    expected = estimate_prior(models, dev, max_sequences=100)
    got = [p["weight"] for p in rec.lineage["parents"]]
    assert got == pytest.approx(expected.tolist(), abs=1e-6)
    with pytest.raises(InvalidExpertError, match="no optimizer state"):
        btm.train("never", out["experts"][0], "jargon", DENSE, resume=True)


def test_forest_records_where_its_prior_came_from(run):
    btm, out, _ = run
    ids = out["experts"]
    seqs = dev_sequences(btm.token_ids(btm.repo.cache.get(ids[0]).tokenizer, "code", "validation"), 4, 64)
    est = create_forest(btm.repo, "f-est", ids, prior_sequences=seqs, prior_source={"corpus": "code"})
    assert est.spec["prior_source"] == {"corpus": "code", "kind": "estimated", "sequences": 4}
    assert create_forest(btm.repo, "f-exp", ids, prior=[0.2, 0.8]).spec["prior_source"] == {"kind": "explicit"}
    assert create_forest(btm.repo, "f-uni", ids).spec["prior_source"] == {"kind": "uniform"}
