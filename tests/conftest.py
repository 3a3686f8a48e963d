from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.helpers import CLIENT_KEY, Gateway, build_model_dir, build_tokenizer
from tests.pg import PostgresServer, unavailable


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("models") / "tiny", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def gateway(tmp_path_factory, tiny_model_dir):
    """One shared gateway (client keys on) with the tiny model registered as `tiny`."""
    gw = Gateway(tmp_path_factory.mktemp("gw") / "data", api_keys=CLIENT_KEY,
                 extra_env={"MERGEGATE_MAX_UPLOAD_BYTES": str(8 << 20),
                            "MERGEGATE_CORPUS_BYTES": "300000"}).start()
    try:
        gw.register("tiny", tiny_model_dir, tags=["test"], domain="python-docs")
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL server for the session; skips (saying why) where PostgreSQL cannot run."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty registry database on each backend: SQLite in tmp_path, and a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    server = request.getfixturevalue("postgres")
    url = server.create_database()
    try:
        yield url
    finally:
        server.drop_database(url)


@pytest.fixture(scope="session")
def ray_runner():
    """A local Ray cluster of 2 CPUs for the session (skips where ray is not installed); 2 workers a job."""
    ray = pytest.importorskip("ray")
    from experts.training.ray_runner import RayRunner  # ray is optional: imported only for its tests

    runner = RayRunner(num_cpus=2, workers=2)
    runner.start()
    try:
        yield runner
    finally:
        ray.shutdown()
