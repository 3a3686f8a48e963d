"""MERGEGATE_RUNNER selects where the heavy jobs run: local by default, Ray when asked (nothing starts
Ray until a job needs it). A search job on a Ray gateway finds and registers what a local search finds."""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.main import build_services, create_app
from app.metrics import Metrics
from app.settings import Settings
from experts.evo.search_job import LocalProvider, SearchSpec, run_search
from experts.evo.sessions import MergeSessionManager
from experts.runtime import open_repository
from experts.training.ray_runner import RayRunner
from merging.search.settings import SearchSettings
from tests.helpers import ADMIN_KEY, build_adapter_dir

EXAMPLES = [
    {"prompt": "def add(a, b):\n", "completion": "    return a + b"},
    {"prompt": "Lists are", "completion": " mutable sequences."},
    {"text": "The with statement wraps the execution of a block with methods defined by a context manager."},
]
IDS = ["ra-0", "ra-1", "ra-2"]
SMALL = {"budget_stage1": 8, "budget_stage2": 8, "popsize": 4, "seed": 7}


@pytest.mark.parametrize("env,runner", [({}, None), ({"MERGEGATE_RUNNER": "ray", "MERGEGATE_RAY_ADDRESS": "auto",
                                                      "MERGEGATE_RAY_WORKERS": "3"}, RayRunner)])
def test_the_runner_setting_reaches_btm_and_searches(tmp_path, monkeypatch, env, runner):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    services = build_services(Settings(data_dir=tmp_path / "data"), Metrics(), httpx.AsyncClient())
    try:
        got = services.btm.btm.runner
        assert got is services.searches.runner
        if runner is None:
            assert got is None
        else:
            assert isinstance(got, RayRunner) and got.address == "auto" and got.workers == 3
    finally:
        services.close()


def test_an_unknown_runner_is_refused(monkeypatch):
    monkeypatch.setenv("MERGEGATE_RUNNER", "dask")
    with pytest.raises(ValidationError, match="runner"):
        Settings()


def test_a_search_job_on_ray_registers_the_local_winner(tmp_path, tiny_model_dir, ray_runner):
    dirs = [build_adapter_dir(tmp_path / "src" / i, tiny_model_dir, seed=40 + n) for n, i in enumerate(IDS)]
    settings = Settings(data_dir=tmp_path / "data", admin_key=ADMIN_KEY, runner="ray", ray_workers=2)
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as c:
        for eid, d in [("tiny", tiny_model_dir), *zip(IDS, dirs, strict=True)]:
            extra = {"base": "tiny"} if eid != "tiny" else {}
            r = c.post("/admin/experts", json={"id": eid, "path": str(d), **extra})
            assert r.status_code == 201, r.text
        r = c.post("/admin/searches", json={"base": "tiny", "pool": IDS, "validation": {"examples": EXAMPLES},
                                            "name": "ra-won", **SMALL})
        assert r.status_code == 202, r.text
        for _ in range(600):  # at most 2 minutes
            job = c.get(f"/admin/jobs/{r.json()['id']}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.2)
        assert job["status"] == "succeeded", job
        got = job["result"]["search"]
        assert job["detail"]["session"]["n"] == 3 and job["detail"]["queries_used"] == got["queries"] == 16
        won = c.get("/admin/experts/ra-won").json()
        assert won["kind"] == "lora" and won["lineage"]["search"]["alpha"] == got["alpha"]
    # the same search with the local runner, in process: the same winner
    repo = open_repository(tmp_path / "local", max_loaded_models=4, max_loaded_bytes=1 << 30)
    try:
        repo.register_from_dir("tiny", tiny_model_dir)
        for eid, d in zip(IDS, dirs, strict=True):
            repo.register_from_dir(eid, d, base="tiny")
        local = LocalProvider(MergeSessionManager(repo))
        spec = SearchSpec(session={"base": "tiny", "pool": IDS, "validation": {"examples": EXAMPLES}},
                          settings=SearchSettings(method="evo_merging", **SMALL))
        expected, view = run_search(local, spec)
        local.materialize(view["id"], expected.alpha, expected.beta, "ra-won")
        assert got["loss"] == pytest.approx(expected.loss, abs=1e-5)
        assert got["alpha"] == pytest.approx(list(expected.alpha))
        assert got["beta"] == pytest.approx(list(expected.beta))
        mine, theirs = won["lineage"]["recipe"], repo.record("ra-won").lineage["recipe"]  # the same evo merge
        assert mine["method"] == theirs["method"] == "evo"
        for x, y in zip(mine["experts"], theirs["experts"], strict=True):
            assert x["id"] == y["id"] and (x["alpha"], x["beta"]) == pytest.approx((y["alpha"], y["beta"]))
    finally:
        repo.close()
