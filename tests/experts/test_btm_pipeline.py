"""A pipeline cut short (a crash, a cancel) resumes from the stages it registered, and never reuses or
overwrites an expert it did not make."""

from __future__ import annotations

import hashlib

import pytest

from experts.btm.operations import BTM, ModelSize
from experts.btm.pipeline import run_pipeline
from experts.errors import PipelineConflictError
from experts.runtime import open_repository
from experts.training.config import TrainConfig

SIZE = ModelSize(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=384)
BUDGET = TrainConfig(max_tokens=8 * 32 * 12, batch_size=8, seq_len=32, lr=3e-3)
DOMAINS = ["code", "python_docs"]
SEQ = {"branch_from": "posterior"}  # the sequential variant: intermediate branches to resume from


class Crash(Exception):
    pass


def crash_at(text: str):
    def progress(fraction: float, message: str) -> None:
        if text in message:
            raise Crash(message)
    return progress


def digest(btm: BTM, expert_id: str) -> str:
    path = btm.repo.artifact_dir(btm.repo.record(expert_id)) / "model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_pipeline_cut_short_resumes_from_what_it_registered(tmp_path):
    """The sequential variant (branch_from=posterior), whose intermediate branches make resuming hardest."""
    repo = open_repository(tmp_path / "data", max_loaded_models=4, max_loaded_bytes=1 << 30)
    btm = BTM(repo, tmp_path / "data", corpus_bytes=120_000)
    try:
        with pytest.raises(Crash):  # dies while training the second domain's expert
            run_pipeline(btm, "p", DOMAINS, BUDGET, size=SIZE, **SEQ, progress=crash_at("[python_docs]"))
        ids = {r.id for r in repo.list()}
        assert ids == {"p-seed", "p-code", "p-python_docs-init"}  # finished stages, and the branch being trained
        seed, code = digest(btm, "p-seed"), digest(btm, "p-code")

        with pytest.raises(PipelineConflictError, match="made with other pipeline settings"):
            run_pipeline(btm, "p", DOMAINS, BUDGET.scaled(2.0), size=SIZE, **SEQ)  # other settings: not resumed

        out = run_pipeline(btm, "p", DOMAINS, BUDGET, size=SIZE, **SEQ)
        assert out["resumed"] == ["p-seed", "p-code"]
        assert {r.id for r in repo.list()} == {"p-seed", "p-code", "p-python_docs", "p-forest", "p-average"}
        assert digest(btm, "p-seed") == seed and digest(btm, "p-code") == code  # kept, not retrained
        lineage = repo.record("p-python_docs").lineage
        assert lineage["op"] == "btm.branch-train" and lineage["pipeline"]["stage"] == "python_docs"
        assert [p["id"] for p in lineage["parents"]] == ["p-code"]

        again = run_pipeline(btm, "p", DOMAINS, BUDGET, size=SIZE, **SEQ)  # all done: nothing left to do
        assert again["resumed"] == ["p-seed", "p-code", "p-python_docs", "p-forest", "p-average"]

        btm.branch("q-seed", ["p-seed"])  # an expert the pipeline did not make
        with pytest.raises(PipelineConflictError, match="'q-seed' already exists and was not made by a pipeline"):
            run_pipeline(btm, "q", DOMAINS, BUDGET, size=SIZE, **SEQ)
        assert not repo.registry.has_expert("q-code")
    finally:
        repo.close()
