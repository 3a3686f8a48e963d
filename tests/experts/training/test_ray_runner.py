"""MERGEGATE_RUNNER=ray for BTM: a pipeline's first round trained as parallel Ray tasks gives the experts
the local runner gives (same weights, same lineage); a task's error fails the pipeline with the task's
message and a cancel stops it, both registering none of the round's experts and leaving no staging."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from experts.btm.operations import BTM, ModelSize
from experts.btm.pipeline import pipeline_key, run_pipeline
from experts.btm.protocol import plan_budget
from experts.errors import InvalidExpertError, JobCancelledError
from experts.runtime import open_repository
from experts.training.config import TrainConfig

SIZE = ModelSize(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=384)
BUDGET = TrainConfig(max_tokens=8 * 32 * 12, batch_size=8, seq_len=32, lr=3e-3)
DOMAINS = ["code", "python_docs"]
CORPUS = 120_000


@pytest.fixture
def one_thread():
    """The Ray tasks run torch on one thread (one CPU each): the local reference does too."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def open_btm(root, runner=None) -> BTM:
    repo = open_repository(root / "data", max_loaded_models=4, max_loaded_bytes=1 << 30)
    return BTM(repo, root / "data", corpus_bytes=CORPUS, runner=runner)


def weights(btm: BTM, expert_id: str) -> dict[str, torch.Tensor]:
    return load_file(str(btm.repo.artifact_dir(btm.repo.record(expert_id)) / "model.safetensors"))


def without_timing(lineage: dict) -> dict:
    return {**lineage, "train": {k: v for k, v in lineage["train"].items() if k != "seconds"}}


def test_the_first_round_on_ray_gives_the_local_runners_experts(tmp_path, ray_runner, one_thread):
    local, ray = open_btm(tmp_path / "local"), open_btm(tmp_path / "ray", ray_runner)
    try:
        expected = run_pipeline(local, "p", DOMAINS, BUDGET, size=SIZE)
        messages: list[str] = []
        out = run_pipeline(ray, "p", DOMAINS, BUDGET, size=SIZE, progress=lambda f, m: messages.append(m))
        assert out == expected and out["resumed"] == []
        assert any("training 2 experts as parallel tasks" in m for m in messages)
        assert any("2/2 experts trained" in m for m in messages)
        for expert_id in ("p-seed", "p-code", "p-python_docs", "p-average"):
            a, b = weights(local, expert_id), weights(ray, expert_id)
            assert a.keys() == b.keys()
            for name in a:  # bit for bit: the same code on one thread, the same seeds
                assert torch.equal(a[name], b[name]), (expert_id, name)
        for expert_id in ("p-code", "p-python_docs"):
            assert without_timing(ray.repo.record(expert_id).lineage) == \
                without_timing(local.repo.record(expert_id).lineage)
        assert not any((tmp_path / "ray" / "data" / "staging").iterdir())
    finally:
        local.repo.close()
        ray.repo.close()


def test_an_error_inside_a_task_or_a_cancel_fails_the_round_and_registers_nothing(tmp_path, ray_runner):
    btm = open_btm(tmp_path, ray_runner)
    started = []

    def progress(fraction: float, message: str) -> None:
        if "parallel tasks" in message:
            started.append(message)

    try:
        # the pipeline's own seed, but saved without its optimizer state: every task fails resuming it
        key = pipeline_key(DOMAINS, BUDGET, SIZE, 0.5, None, True, "seed")
        plan = plan_budget(BUDGET, len(DOMAINS), seed_fraction=0.5, batch_split="paper")
        btm.seed("bad-seed", DOMAINS, plan.seed, SIZE, keep_state=False,
                 lineage={"pipeline": {"key": key, "prefix": "bad", "stage": "seed"}})
        with pytest.raises(InvalidExpertError, match="'bad-seed' carries no optimizer state to resume"):
            run_pipeline(btm, "bad", DOMAINS, BUDGET, size=SIZE)
        assert {r.id for r in btm.repo.list()} == {"bad-seed"}
        assert not any((tmp_path / "data" / "staging").iterdir())

        with pytest.raises(JobCancelledError):  # cancelled once the round's tasks are submitted
            run_pipeline(btm, "c", DOMAINS, BUDGET, size=SIZE, progress=progress, should_stop=lambda: bool(started))
        assert started and {r.id for r in btm.repo.list()} == {"bad-seed", "c-seed"}  # the same request resumes
        assert not any((tmp_path / "data" / "staging").iterdir())
    finally:
        btm.repo.close()
