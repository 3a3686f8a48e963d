"""The container image (Dockerfile, docker-compose.yml) and scripts/container-check (docs/container.md).

The real check builds the image and runs it (several minutes): it runs only with MERGEGATE_CONTAINER_TESTS=1 and an
engine (docker with a daemon, or podman). The rest is quick and always runs."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import yaml

from app import cli
from tests.helpers import ROOT

CHECK = ROOT / "scripts" / "container-check"


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_runs_as_a_user_binds_all_interfaces_keeps_data_on_a_volume_and_checks_health():
    text = dockerfile()
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M) and "FROM ${BASE_IMAGE}" in text
    final = text[text.rindex("\nFROM "):]  # the runtime stage
    assert re.search(r"^USER mergegate$", final, re.M)
    assert "MERGEGATE_HOST=0.0.0.0" in final and "MERGEGATE_DATA_DIR=/data" in final
    assert 'VOLUME ["/data"]' in final and re.search(r"^EXPOSE 8000$", final, re.M)
    assert "HEALTHCHECK" in final and "/health" in final
    assert 'CMD ["mergegate", "demo"]' in final
    # CPU torch, pinned by constraints.txt, and a CUDA build refused
    assert "-c constraints.txt torch==2.13.0" in text and "torch.version.cuda is None" in text
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()


def test_compose_matches_the_dockerfile():
    svc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["gateway"]
    assert svc["ports"] == ["127.0.0.1:8000:8000"]  # the image's port, published on the host's loopback only
    assert [v.split(":")[1] for v in svc["volumes"]] == ["/data"]
    assert set(svc["build"]["args"]) <= set(re.findall(r"^ARG (\w+)=", dockerfile(), re.M))
    assert svc["command"][:2] == ["mergegate", "demo"]


def test_container_check_skips_with_one_line_without_an_engine_unless_required():
    env = {**os.environ, "MERGEGATE_CONTAINER_ENGINE": "no-such-engine"}
    env.pop("MERGEGATE_REQUIRE_CONTAINER", None)
    r = subprocess.run([str(CHECK)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "container-check: skipped: no-such-engine is not installed\n"
    r = subprocess.run([str(CHECK)], env={**env, "MERGEGATE_REQUIRE_CONTAINER": "1"}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "no-such-engine is not installed" in r.stderr and "skipped" not in r.stdout


def test_demo_quick_from_the_environment(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "_serve", lambda settings: seen.setdefault("demo", settings.demo))
    monkeypatch.setenv("MERGEGATE_DEMO", "quick")
    cli.main(["demo", "--data-dir", str(tmp_path)])
    assert seen["demo"] == "quick"
    monkeypatch.delenv("MERGEGATE_DEMO")
    seen.clear()
    cli.main(["demo", "--data-dir", str(tmp_path)])
    assert seen["demo"] == "full"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MERGEGATE_CONTAINER_TESTS") != "1",
                    reason="builds and runs the image (minutes): set MERGEGATE_CONTAINER_TESTS=1")
def test_container_check_builds_runs_and_restarts_the_image():
    r = subprocess.run([str(CHECK)], env={**os.environ, "MERGEGATE_REQUIRE_CONTAINER": "1"}, capture_output=True,
                       text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.strip().splitlines()[-1].startswith("container-check: passed")
