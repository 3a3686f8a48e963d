"""Branch-Train-Merge operations on a real (tiny) repository: lineage, training effect, forests, averages."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from experts.btm.forest import average_forest, create_forest, sample_sequences
from experts.btm.operations import BTM, ModelSize
from experts.data.evaluation import evaluate_ids
from experts.errors import ExpertInUseError, InvalidExpertError, JobCancelledError
from experts.runtime import open_repository
from experts.training.config import TrainConfig

SIZE = ModelSize(n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=512)
BUDGET = TrainConfig(max_tokens=8 * 64 * 30, batch_size=8, seq_len=64, lr=3e-3)
DOMAINS = ["code", "python_docs"]


@pytest.fixture(scope="module")
def btm(tmp_path_factory):
    data = tmp_path_factory.mktemp("btm")
    repo = open_repository(data, database_url=f"sqlite:///{data / 'r.db'}", max_loaded_models=8,
                           max_loaded_bytes=1 << 30)
    b = BTM(repo, data, corpus_bytes=200_000)
    b.seed("seed", DOMAINS, BUDGET, SIZE)
    yield b
    repo.close()


def weights(btm: BTM, expert_id: str) -> dict[str, torch.Tensor]:
    return load_file(btm.repo.artifact_dir(btm.repo.record(expert_id)) / "model.safetensors")


def val_loss(btm: BTM, expert_id: str, domain: str) -> float:
    m = btm.repo.cache.get(expert_id)
    ids = btm.token_ids(m.tokenizer, domain, "validation")[:4096]
    return evaluate_ids(m.model, ids, 1, context_length=64, stride=64).loss


def test_seed_is_registered_with_lineage(btm):
    r = btm.repo.record("seed")
    assert r.lineage["op"] == "btm.seed" and r.lineage["recipe"]["domains"] == DOMAINS
    assert r.lineage["train"]["tokens"] >= BUDGET.max_tokens
    assert r.lineage["train"]["final_val_loss"] < 6.2  # below uniform over 512 tokens (ln 512 = 6.24)


def test_branch_is_the_weighted_average_and_train_specialises(btm):
    btm.train("code-a", "seed", "code", BUDGET, seed_offset=1)
    btm.branch("b2", ["seed", "code-a"], weights=[0.25, 0.75])
    s, a, b = weights(btm, "seed"), weights(btm, "code-a"), weights(btm, "b2")
    for k in s:
        torch.testing.assert_close(b[k], 0.25 * s[k] + 0.75 * a[k], atol=1e-6, rtol=0)
    assert btm.repo.record("b2").lineage["op"] == "btm.branch"
    # Training on one domain lowers validation loss on that domain.
    assert val_loss(btm, "code-a", "code") < val_loss(btm, "seed", "code")
    r = btm.repo.record("code-a")
    assert r.lineage["parents"] == [{"id": "seed", "weight": 1.0}] and r.domain == "code"


def test_branch_default_weights_are_a_posterior(btm):
    w = btm.branch_weights(["seed", "code-a"], "code")
    assert len(w) == 2 and abs(sum(w) - 1) < 1e-6 and all(0 <= x <= 1 for x in w)
    assert w[1] > w[0]  # the code expert explains code text better


def test_forest_average_and_refusals(btm):
    btm.train("docs-a", "seed", "python_docs", BUDGET, seed_offset=2)
    tok = btm.repo.cache.get("seed").tokenizer
    seqs = sample_sequences(btm.token_ids(tok, "code", "validation"), 4, 64)
    f = create_forest(btm.repo, "forest", ["code-a", "docs-a"], prior_sequences=seqs, top_k=2)
    assert f.kind == "ensemble" and abs(sum(f.spec["prior"]) - 1) < 1e-6
    assert f.spec["prior"][0] > f.spec["prior"][1]  # code target data favours the code expert
    avg = average_forest(btm.repo, "forest", "avg-u", weighting="uniform")
    assert avg.lineage["op"] == "btm.average.uniform"
    a, b, m = weights(btm, "code-a"), weights(btm, "docs-a"), weights(btm, "avg-u")
    for k in a:
        torch.testing.assert_close(m[k], 0.5 * a[k] + 0.5 * b[k], atol=1e-6, rtol=0)
    # The forest serves through the generation code like any expert.
    from experts.base import GenerationParams

    out = btm.repo.get("forest").generate("def ", GenerationParams(max_tokens=5, temperature=0, logprobs=1))
    assert out.choices[0].tokens and all(t.logprob <= 0 for t in out.choices[0].tokens)
    with pytest.raises(ExpertInUseError):
        btm.repo.delete("code-a")
    with pytest.raises(InvalidExpertError):
        create_forest(btm.repo, "bad", ["code-a", "code-a"])
    with pytest.raises(InvalidExpertError):
        create_forest(btm.repo, "bad", ["code-a", "docs-a"], top_k=3)


def test_cancelled_training_registers_nothing(btm):
    with pytest.raises(JobCancelledError):
        btm.train("never", "seed", "code", BUDGET, should_stop=lambda: True)
    assert not btm.repo.registry.has_expert("never")
