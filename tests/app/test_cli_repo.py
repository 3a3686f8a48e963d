"""`mergegate experts|jobs|merge` against a live gateway: tables for people, JSON for machines, one clear line and
a non-zero exit when the server refuses."""

from __future__ import annotations

import json
import tarfile

import pytest

from app.cli import main
from tests.helpers import ADMIN_KEY, build_model_dir

LINEAR = """merge_method: linear
models:
  - model: cli-a
    parameters: {weight: 0.5}
  - model: cli-b
    parameters: {weight: [0.2, 0.8]}
"""


@pytest.fixture
def cli(gateway, monkeypatch, capsys):
    monkeypatch.setenv("MERGEGATE_URL", gateway.base)
    monkeypatch.setenv("MERGEGATE_ADMIN_KEY", ADMIN_KEY)

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            main(list(argv))
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("cli-models")
    return [build_model_dir(root / f"m{i}", tokenizer=tokenizer, seed=60 + i) for i in range(2)]


def test_experts_add_list_show_pin_rm(cli, model_dirs):
    code, out, _ = cli("experts", "add", "cli-a", str(model_dirs[0]), "--tags", "code,cli")
    assert code == 0 and out.startswith("added cli-a (local")
    assert cli("experts", "add", "cli-b", str(model_dirs[1]))[0] == 0
    code, out, _ = cli("experts", "list")
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["ID", "KIND", "STATUS", "SIZE"]
    row = next(r for r in rows if r.startswith("cli-a "))
    assert "local" in row and "ready" in row and "code,cli" in row and "KB" in row
    code, out, _ = cli("experts", "list", "--json")
    assert {"cli-a", "cli-b"} <= {e["id"] for e in json.loads(out)}
    code, out, _ = cli("experts", "show", "cli-a")
    assert code == 0 and "kind          local" in out and "tags          code,cli" in out
    assert "pinned" in cli("experts", "pin", "cli-a")[1]
    code, out, _ = cli("experts", "pin", "cli-a", "--off", "--json")
    assert json.loads(out)["pinned"] is False


def test_merge_from_a_mergekit_config_with_a_progress_bar(cli, tmp_path, model_dirs):
    if cli("experts", "show", "cli-a")[0]:
        test_experts_add_list_show_pin_rm(cli, model_dirs)
    config = tmp_path / "linear.yml"
    config.write_text(LINEAR)
    code, out, err = cli("merge", str(config), "--id", "cli-merged")
    assert code == 0, err
    assert "expert cli-merged" in out and "succeeded [" in err and "100%" in err
    code, out, _ = cli("experts", "show", "cli-merged")
    assert "lineage       merge of cli-a (w=0.5), cli-b" in out
    code, out, _ = cli("jobs", "list", "--kind", "merge")
    assert out.splitlines()[0].split()[:4] == ["ID", "KIND", "TARGET", "STATUS"]
    job = json.loads(cli("jobs", "list", "--kind", "merge", "--json")[1])[0]
    assert job["params"]["id"] == "cli-merged" and job["status"] == "succeeded"
    code, out, err = cli("jobs", "watch", job["id"])
    assert code == 0 and "succeeded" in out
    code, out, err = cli("jobs", "cancel", job["id"])  # already over: the server's 409, one line
    assert code == 1 and err.count("\n") == 1 and err.startswith("mergegate: error: ") and "(HTTP 409)" in err
    code, out, _ = cli("experts", "export", "cli-merged", "-o", str(tmp_path / "m.tar"))
    assert code == 0 and out.startswith(f"exported cli-merged to {tmp_path / 'm.tar'}")
    with tarfile.open(tmp_path / "m.tar") as tar:
        assert "cli-merged/README.md" in tar.getnames() and "cli-merged/model.safetensors" in tar.getnames()
    code, out, _ = cli("experts", "rm", "cli-merged")
    assert code == 0 and out.strip() == "deleted cli-merged"


def test_server_refusals_are_one_line_and_exit_1(cli, tmp_path, gateway):
    code, out, err = cli("experts", "show", "no-such-expert")
    assert code == 1 and out == "" and err.count("\n") == 1 and "no-such-expert" in err and "(HTTP 404)" in err
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: linear\nslices: [{sources: [{model: cli-a, layer_range: [0, 1]}]}]\n")
    code, _, err = cli("merge", str(bad), "--id", "cli-frankenmerge")
    assert code == 1 and "slices" in err and "(HTTP 400)" in err
    code, _, err = cli("experts", "list", "--key", "wrong-key")
    assert code == 1 and ("(HTTP 401)" in err or "(HTTP 403)" in err)
    code, _, err = cli("merge", str(tmp_path / "missing.yml"), "--id", "x")
    assert code == 1 and "cannot read" in err
