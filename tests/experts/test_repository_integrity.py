"""The repository never deletes user artifacts on a guess: orphans are quarantined and adoptable, a
registry is bound to its data dir, and a mismatched pair refuses to open with nothing touched."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa

from experts.errors import ExpertExistsError, InvalidExpertError, OrphanNotFoundError, RegistryMismatchError
from experts.repository.registry import Registry
from experts.runtime import open_repository


def tree(root: Path) -> dict[str, str]:
    """Every file under root (relative path -> sha256), registry and its WAL files aside."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith("registry.db")}


def artifact_contents(root: Path) -> set[str]:
    """The content hashes of every artifact file, wherever it lies under the data dir."""
    return {h for rel, h in tree(root).items() if rel.startswith(("experts/", "orphans/"))}


@pytest.fixture()
def data(tmp_path, tiny_model_dir) -> Path:
    data = tmp_path / "data"
    repo = open_repository(data)
    try:
        repo.register_from_dir("kept", tiny_model_dir, tags=["t"])
    finally:
        repo.close()
    return data


def test_a_registry_is_bound_to_its_data_dir(data):
    ident = (data / "registry_id").read_text().strip()
    assert ident.startswith("reg-")
    reg = Registry(f"sqlite:///{data / 'registry.db'}")
    assert reg.read_meta("registry_id") == ident
    reg.close()
    repo = open_repository(data)  # the pair opens again, and stays bound to the same id
    assert repo.record("kept").status == "ready"
    repo.close()
    assert (data / "registry_id").read_text().strip() == ident


@pytest.mark.parametrize("how", ["other database", "recreated registry.db", "registry of another data dir"])
def test_a_mismatched_pair_refuses_to_open_and_touches_nothing(data, tmp_path, tiny_model_dir, how):
    url = None
    if how == "other database":
        url = f"sqlite:///{tmp_path / 'other.db'}"
    elif how == "recreated registry.db":
        for p in data.glob("registry.db*"):
            p.unlink()
    else:
        other = tmp_path / "other-data"
        open_repository(other).close()  # a second, bound, empty data dir and registry
        url = f"sqlite:///{other / 'registry.db'}"
    before = tree(data)
    with pytest.raises(RegistryMismatchError) as e:
        open_repository(data, database_url=url)
    assert "--rebind-registry" in str(e.value) and "nothing is deleted" in str(e.value)
    assert tree(data) == before  # every file in place, no orphan moved
    if how == "other database":
        assert Registry(url).read_meta("registry_id") is None  # and the other database was not written


def test_an_unbound_data_dir_with_artifacts_refuses_an_empty_registry(data, tmp_path):
    (data / "registry_id").unlink()  # a data dir and registry from before binding existed
    reg = Registry(f"sqlite:///{data / 'registry.db'}")
    with reg.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM meta"))
    reg.close()
    before = tree(data)
    with pytest.raises(RegistryMismatchError, match="is empty, but the data dir"):
        open_repository(data, database_url=f"sqlite:///{tmp_path / 'typo.db'}")
    assert tree(data) == before
    open_repository(data).close()  # its own registry binds it (first start after the upgrade)
    assert (data / "registry_id").is_file()


def test_rebind_deletes_nothing_and_quarantines_what_has_no_row(data, tmp_path, tiny_model_dir):
    contents = artifact_contents(data)
    repo = open_repository(data, database_url=f"sqlite:///{tmp_path / 'new.db'}", rebind=True)
    try:
        assert repo.list() == []
        assert not any((data / "experts").iterdir())
        orphans = repo.store.list_orphans()
        assert [o.suggested_id for o in orphans] == ["kept"] and orphans[0].looks_like == "model"
        assert artifact_contents(data) == contents  # moved, not deleted
        record = repo.adopt_orphan(orphans[0].name, "kept", tags=["back"])
        assert record.status == "ready" and record.tags == ["back"]
        assert repo.store.list_orphans() == []
    finally:
        repo.close()
    open_repository(data, database_url=f"sqlite:///{tmp_path / 'new.db'}").close()  # now a pair


def test_an_artifact_without_a_row_is_quarantined_then_adopted_or_deleted(data, tiny_model_dir):
    repo = open_repository(data)
    try:  # a crash between the rename into the store and the row insert
        staging = repo.stage_copy(tiny_model_dir)
        repo.store.commit(staging, "half-done")
        (repo.store.orphans_dir / "junk").mkdir()
        (repo.store.orphans_dir / "junk" / "notes.txt").write_text("not a model")
    finally:
        repo.close()
    repo = open_repository(data)
    try:
        names = {o.suggested_id: o for o in repo.store.list_orphans()}
        assert set(names) == {"half-done", "junk"} and names["junk"].looks_like == "unknown"
        assert names["half-done"].files == sorted(p.name for p in (repo.store.orphans_dir /
                                                                   names["half-done"].name).iterdir())
        with pytest.raises(InvalidExpertError, match="config.json is missing"):
            repo.adopt_orphan("junk", "junk")
        assert (repo.store.orphans_dir / "junk" / "notes.txt").is_file()  # a refused adoption keeps the orphan
        with pytest.raises(ExpertExistsError):
            repo.adopt_orphan(names["half-done"].name, "kept")
        repo.adopt_orphan(names["half-done"].name, "half-done")
        assert repo.record("half-done").status == "ready" and repo.store.list_orphans()[0].name == "junk"
        repo.store.delete_orphan("junk")
        assert repo.store.list_orphans() == []
        for bad in ("junk", "../experts", "", "a/b"):
            with pytest.raises(OrphanNotFoundError):
                repo.store.delete_orphan(bad)
    finally:
        repo.close()


def test_a_row_whose_artifact_is_gone_is_marked_missing_until_it_is_back(data):
    repo = open_repository(data)
    path = repo.artifact_dir(repo.record("kept"))
    repo.close()
    shutil.move(path, data / "aside")
    repo = open_repository(data)
    assert repo.record("kept").status == "missing"
    repo.close()
    shutil.move(data / "aside", path)
    repo = open_repository(data)
    assert repo.record("kept").status == "ready"
    repo.close()
