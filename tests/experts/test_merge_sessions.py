"""Merge sessions in process: loss = the materialised expert's loss, modes agree, budget, vectors, pools,
concurrency; LoRA training lowers the validation loss and registers a lora expert; tasks are deterministic."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from experts.btm.operations import BTM
from experts.data.datasets import HELD_OUT, POOL_TASKS, TASKS, load_task
from experts.errors import ExpertNotFoundError, InvalidExpertError, JobCancelledError
from experts.evo.sessions import (
    BudgetExhaustedError,
    InvalidCandidateError,
    LossOptions,
    MergeSessionManager,
    SessionLimitError,
    SessionNotFoundError,
    ValidationSpec,
)
from experts.runtime import open_repository
from experts.training.config import TrainConfig
from experts.training.lora import LoraData, LoraSpec, train_lora
from tests.helpers import build_adapter_dir, build_model_dir

TARGETS = ("c_attn", "c_proj", "c_fc")
EXAMPLES = (
    {"prompt": "def add(a, b):\n", "completion": "    return a + b"},
    {"prompt": "Lists are", "completion": " mutable sequences, typically used to store collections of items."},
    {"text": "The with statement is used to wrap the execution of a block with methods defined by a context manager."},
    {"prompt": "", "completion": "import os"},
    {"prompt": "for i in range(10):\n", "completion": "    print(i)"},
)
A = [1.0, 0.6, 0.3, 0.9]
B = [0.4, -0.3, 0.8, 0.2]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is as fast, and does not stall when other processes load the CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir, tokenizer):
    root = tmp_path_factory.mktemp("msess")
    repo = open_repository(root / "data", database_url=f"sqlite:///{root / 'r.db'}", max_loaded_models=4,
                           max_loaded_bytes=1 << 30)
    repo.register_from_dir("tiny", tiny_model_dir)
    for i in range(4):
        d = build_adapter_dir(root / "src" / f"ad{i}", tiny_model_dir, seed=i, targets=TARGETS)
        repo.register_from_dir(f"ad{i}", d, base="tiny", tags=["pool"] + (["even"] if i % 2 == 0 else []))
    other = build_model_dir(root / "src" / "tiny2", tokenizer=tokenizer, seed=1)
    repo.register_from_dir("tiny2", other)
    repo.register_from_dir("other-ad", build_adapter_dir(root / "src" / "oad", other, targets=TARGETS), base="tiny2")
    repo.register_from_dir("r8-ad", build_adapter_dir(root / "src" / "r8", tiny_model_dir, rank=8, targets=TARGETS),
                           base="tiny")
    btm = BTM(repo, root / "data", corpus_bytes=200_000)
    yield repo, btm, MergeSessionManager(repo, btm=btm, max_sessions=16)
    repo.close()


def direct_loss(model, tok, examples) -> float:
    """Reference: full logits, one example at a time, scored tokens only (no shared code with the session)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for e in examples:
            if "text" in e:
                ids, first = tok(e["text"], add_special_tokens=False)["input_ids"][:128], 1
            else:
                p = tok(e["prompt"], add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
                ids = p + tok(e["completion"], add_special_tokens=False)["input_ids"]
                first = len(p)
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0]
            total += F.cross_entropy(logits[first - 1:-1], x[0, first:], reduction="sum").item()
            n += len(ids) - first
    return total / n


def test_evaluate_equals_the_materialised_expert(env, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    repo, _, mgr = env
    s = mgr.create("tiny", ["ad0", "ad1", "ad2", "ad3"], ValidationSpec(examples=EXAMPLES), budget=10)
    assert s.mode == "dense" and s.n == 4 and s.n_examples == len(EXAMPLES)
    loss = s.evaluate(A, B)
    assert isinstance(loss, float) and s.used == 1
    rec = mgr.materialize(s.id, A, B, "sess-merged")
    assert s.used == 2  # materialising counts as a query
    assert rec.kind == "lora" and rec.spec["base"] == "tiny"
    recipe = rec.lineage["recipe"]
    assert recipe["method"] == "evo" and [e["alpha"] for e in recipe["experts"]] == A
    assert [e["beta"] for e in recipe["experts"]] == B and rec.lineage["session"]["id"] == s.id
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      repo.artifact_dir(rec)).eval()
    ref = direct_loss(model, AutoTokenizer.from_pretrained(tiny_model_dir), EXAMPLES)
    assert abs(loss - ref) < 1e-4
    base_loss = s.evaluate([1.0] * 4, [0.0] * 4)  # beta = 0: the base model
    assert abs(base_loss - direct_loss(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
                                       AutoTokenizer.from_pretrained(tiny_model_dir), EXAMPLES)) < 1e-4
    assert abs(base_loss - loss) > 1e-3


def test_dense_and_peft_modes_agree_and_queries_are_pure(env):
    _, _, mgr = env
    spec = ValidationSpec(examples=EXAMPLES)
    dense = mgr.create("tiny", {"tags": ["pool"]}, spec, mode="dense")
    peft = mgr.create("tiny", {"tags": ["pool"]}, spec, mode="peft")
    assert dense.experts == peft.experts == ["ad0", "ad1", "ad2", "ad3"]
    g = torch.Generator().manual_seed(0)
    cands = [((torch.rand(4, generator=g)).tolist(), (torch.rand(4, generator=g) * 3 - 1.5).tolist()) for _ in range(4)]
    ld = [dense.evaluate(a, b) for a, b in cands]
    lp = [peft.evaluate(a, b) for a, b in cands]
    assert max(abs(x - y) for x, y in zip(ld, lp)) < 1e-5
    assert dense.evaluate(*cands[0]) == ld[0]  # same answer whatever was evaluated in between
    assert dense.evaluate_many(cands, batched=False) == ld  # the per-candidate path
    assert dense.evaluate_many(cands) == pytest.approx(ld, abs=1e-5)  # batched: to float rounding
    assert mgr.create("tiny", {"tags": ["even"]}, spec).experts == ["ad0", "ad2"]


def test_budget_and_bad_vectors(env):
    _, _, mgr = env
    s = mgr.create("tiny", ["ad0", "ad1"], ValidationSpec(examples=EXAMPLES), budget=3)
    for alpha, beta in (([1.0], [0.5, 0.5]), ([1.0, 1.2], [0.5, 0.5]), ([1.0, 1.0], [0.5, -1.6]),
                        ([1.0, float("nan")], [0.5, 0.5]), ([1.0, 1.0], ["x", 0.5])):
        with pytest.raises(InvalidCandidateError):
            s.evaluate(alpha, beta)
    assert s.used == 0
    s.evaluate_many([([1.0, 1.0], [0.5, 0.5]), ([0.5, 0.5], [0.5, -0.5])])
    with pytest.raises(BudgetExhaustedError):
        s.evaluate_many([([1.0, 1.0], [0.5, 0.5])] * 2)  # 1 left, 2 asked: nothing runs
    assert s.used == 2
    s.evaluate([1.0, 0.0], [1.5, -1.5])  # bounds are inclusive
    with pytest.raises(BudgetExhaustedError):
        s.evaluate([1.0, 1.0], [0.5, 0.5])
    assert s.used == 3 and s.remaining == 0


def test_pool_checks(env):
    _, _, mgr = env
    spec = ValidationSpec(examples=EXAMPLES)
    with pytest.raises(InvalidExpertError, match="not on 'tiny'"):
        mgr.create("tiny", ["ad0", "other-ad"], spec)
    with pytest.raises(InvalidExpertError, match="rank"):
        mgr.create("tiny", ["ad0", "r8-ad"], spec)
    with pytest.raises(InvalidExpertError, match="kind"):
        mgr.create("tiny", ["ad0", "tiny2"], spec)
    with pytest.raises(InvalidExpertError, match="more than once"):
        mgr.create("tiny", ["ad0", "ad0"], spec)
    with pytest.raises(ExpertNotFoundError):
        mgr.create("tiny", ["ad0", "ghost"], spec)
    with pytest.raises(InvalidExpertError, match="no lora experts"):
        mgr.create("tiny", {"tags": ["nothing-has-this"]}, spec)
    with pytest.raises(InvalidExpertError):
        mgr.create("tiny", ["ad0"], ValidationSpec(examples=({"prompt": "x", "completion": ""},)))


def test_limits_delete_and_concurrency(env):
    repo, btm, _ = env
    mgr = MergeSessionManager(repo, btm=btm, max_sessions=1)
    s = mgr.create("tiny", ["ad0", "ad1", "ad2"], ValidationSpec(examples=EXAMPLES))
    with pytest.raises(SessionLimitError):
        mgr.create("tiny", ["ad0"], ValidationSpec(examples=EXAMPLES))
    g = torch.Generator().manual_seed(1)
    cands = [(torch.rand(3, generator=g).tolist(), (torch.rand(3, generator=g) - 0.5).tolist()) for _ in range(8)]
    sequential = [s.evaluate(a, b) for a, b in cands]
    out: dict[int, float] = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, s.evaluate(*cands[i]))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [out[i] for i in range(8)] == sequential and s.used == 16
    mgr.delete(s.id)
    with pytest.raises(SessionNotFoundError):
        mgr.get(s.id)
    with pytest.raises(SessionNotFoundError):
        mgr.delete(s.id)
    mgr.create("tiny", ["ad0"], ValidationSpec(examples=EXAMPLES))  # the slot is free again


def test_registered_validation_sources(env):
    _, btm, mgr = env
    s = mgr.create("tiny", ["ad0"], ValidationSpec(task="legal_continue", split="validation", max_examples=6))
    assert s.n_examples == 6 and s.view()["validation"]["task"] == "legal_continue"
    c = mgr.create("tiny", ["ad0"], ValidationSpec(corpus="legal", split="validation", max_examples=4),
                   loss=LossOptions(max_tokens_per_example=64))
    assert c.n_examples == 4 and c.n_tokens <= 4 * 63
    assert s.evaluate([1.0], [0.5]) > 0 and c.evaluate([1.0], [0.5]) > 0


def test_tasks_are_deterministic(env):
    _, btm, _ = env
    assert not set(HELD_OUT) & set(POOL_TASKS) and len(HELD_OUT) >= 3 and len(POOL_TASKS) >= 3
    for name in ("legal_continue", "verse_next", "jargon_define", "lm-legal"):
        a = load_task(btm, name, "validation", 20)
        assert a == load_task(btm, name, "validation", 20) and len(a) > 0
        train = {str(e) for e in load_task(btm, name, "train")}
        assert sum(str(e) in train for e in a) <= 1  # splits come from disjoint documents
    assert all(set(e) == {"prompt", "completion"} for e in load_task(btm, "verse_continue", "test", 5))
    assert TASKS["lm-legal"].kind == "text"


def test_lora_training_lowers_validation_loss_and_registers(env):
    repo, btm, mgr = env
    data = LoraData(examples=tuple({"prompt": f"{w} (n.)", "completion": f" The {w} of a thing; its {w}ness."}
                                   for w in ("colour", "shape", "weight", "size", "length", "smell")),
                    validation=({"prompt": "width (n.)", "completion": " The width of a thing; its widthness."},))
    budget = TrainConfig.lora(max_tokens=2400, batch_size=4, seq_len=32, lr=1e-2)
    rec = train_lora(repo, "lora-pairs", "tiny", data, lora=LoraSpec(r=4, lora_alpha=8, target_modules=TARGETS),
                     budget=budget, btm=btm, tags=["trained"])
    t = rec.lineage["train"]
    assert rec.kind == "lora" and rec.spec["rank"] == 4 and rec.lineage["op"] == "lora.train"
    assert rec.lineage["parents"][0]["id"] == "tiny" and t["tokens"] >= 2400
    assert t["final_val_loss"] < t["initial_val_loss"] - 0.1
    # The session sees the same improvement through the black-box interface.
    s = mgr.create("tiny", ["lora-pairs"], ValidationSpec(examples=data.validation))
    assert abs(s.evaluate([1.0], [0.0]) - t["initial_val_loss"]) < 1e-4
    assert abs(s.evaluate([1.0], [1.0]) - t["final_val_loss"]) < 1e-4
    with pytest.raises(JobCancelledError):
        train_lora(repo, "lora-cancelled", "tiny", data, budget=budget, btm=btm, should_stop=lambda: True)
    assert not repo.registry.has_expert("lora-cancelled")
    assert not list(repo.store.staging_dir.iterdir())  # nothing half-written left behind


def test_pool_plan_covers_pool_tasks_and_slices_but_no_held_out_task():
    from experts.evo.pool import pool_plan

    plan = pool_plan(20)
    ids = [p[0] for p in plan]
    assert len(ids) == 20 == len(set(ids))
    tasks = [p[1].task for p in plan if p[1].task]
    assert sorted(tasks) == sorted(POOL_TASKS) and not set(tasks) & set(HELD_OUT)
    parts = [(p[1].corpus, p[1].part) for p in plan if p[1].corpus]
    assert len(parts) == 15 and len(set(parts)) == 15 and all(c != "jargon" for c, _ in parts)
    assert len(pool_plan(23)) == 23


def test_queries_not_evaluated_are_refunded(env, monkeypatch):
    _, _, mgr = env
    s = mgr.create("tiny", ["ad0", "ad1"], ValidationSpec(examples=EXAMPLES), budget=10)
    real, calls = s._loss, []

    def flaky() -> float:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real()

    monkeypatch.setattr(s, "_loss", flaky)
    with pytest.raises(RuntimeError):
        s.evaluate_many([([1.0, 1.0], [0.5, 0.5])] * 4, batched=False)  # batched: tests/experts/evo
    assert s.used == 1  # the first was evaluated; the failed one and the two never run are given back
