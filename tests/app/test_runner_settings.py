"""MERGEGATE_RUNNER selects where the heavy jobs run: local by default, Ray when asked (nothing starts
Ray until a job needs it)."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from app.main import build_services
from app.metrics import Metrics
from app.settings import Settings
from experts.training.ray_runner import RayRunner


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
