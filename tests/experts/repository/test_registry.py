"""Registry rows read for serving: a recent copy may answer; writes made here show at once."""

import time

import pytest

from experts.errors import ExpertNotFoundError
from experts.repository.registry import ExpertRecord, Registry


@pytest.fixture()
def two(tmp_path):
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    here, other = Registry(url), Registry(url)
    here.migrate()
    yield here, other
    here.close()
    other.close()


def test_a_recent_copy_answers_until_it_is_older_than_max_age(two):
    here, other = two
    here.insert_expert(ExpertRecord(id="m", kind="hf", tags=["a"]))
    assert here.get_expert("m", max_age_s=60).tags == ["a"]
    other.update_expert("m", tags=["b"])  # another process (replica) changes the row
    assert here.get_expert("m", max_age_s=60).tags == ["a"]  # the recent copy
    assert here.get_expert("m").tags == ["b"]  # max_age_s=0: always the database
    other.update_expert("m", tags=["c"])
    time.sleep(0.05)
    assert here.get_expert("m", max_age_s=0.01).tags == ["c"]  # the copy is too old


def test_writes_through_the_same_registry_show_at_once(two):
    here, _ = two
    here.insert_expert(ExpertRecord(id="m", kind="hf", tags=["a"]))
    assert here.get_expert("m", max_age_s=60).tags == ["a"]
    here.update_expert("m", tags=["b"])
    assert here.get_expert("m", max_age_s=60).tags == ["b"]
    copy = here.get_expert("m", max_age_s=60)
    copy.tags.append("mutated by a caller")
    assert here.get_expert("m", max_age_s=60).tags == ["b"]  # callers get copies
    here.delete_expert("m")
    with pytest.raises(ExpertNotFoundError):
        here.get_expert("m", max_age_s=60)
