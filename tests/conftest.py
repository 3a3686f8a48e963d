from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.helpers import CLIENT_KEY, Gateway, build_model_dir, build_tokenizer


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
