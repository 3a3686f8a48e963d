"""Fuzzing the HTTP surface with schemathesis: every operation of /openapi.json, with the admin key and with
a client key, against a live gateway (a tiny registered model, client keys on).

Three phases (deterministic: the same cases on every run):

* admin key, schema-valid cases: no 5xx, responses as documented, no refusal of what the schema allows
  (tests/fuzz_support.py says precisely what a refusal is);
* client key, schema-valid cases: the same, and every admin operation is a 403;
* admin key, schema-invalid cases: each is rejected with a documented 4xx in the envelope, never a 5xx.

Run alone with `pytest tests/test_fuzz.py -s` to see the figures (cases, statuses, 5xx) per phase.
"""

from __future__ import annotations

import time

import pytest
from schemathesis import GenerationMode

from app.auth import Authenticator
from tests.fuzz_support import Stats, Target, fuzz_operation, load_schema
from tests.helpers import ADMIN_KEY, CLIENT_KEY, Gateway

PHASES = {  # name: (key, mode, examples per operation)
    "admin-positive": ("admin", GenerationMode.POSITIVE, 50),
    "client-positive": ("client", GenerationMode.POSITIVE, 12),
    "admin-negative": ("admin", GenerationMode.NEGATIVE, 25),
}


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory, tiny_model_dir):
    gw = Gateway(tmp_path_factory.mktemp("fuzz") / "data", api_keys=CLIENT_KEY,
                 extra_env={"MERGEGATE_JOB_WORKERS": "1", "MERGEGATE_CORPUS_BYTES": "60000",
                            "MERGEGATE_MAX_N": "4"}).start()
    try:
        gw.register("tiny", tiny_model_dir, tags=["fuzz"])
        auth = Authenticator(ADMIN_KEY, [CLIENT_KEY])
        headers = {"admin": {"Authorization": f"Bearer {ADMIN_KEY}"},
                   "client": {"Authorization": f"Bearer {CLIENT_KEY}"}}
        yield Target(gw.base, headers, headers["admin"], auth.role_for, model="tiny"), gw
    finally:
        gw.stop()


@pytest.mark.timeout(900)  # a phase takes one to two minutes; a failure's shrinking takes longer
@pytest.mark.parametrize("phase", list(PHASES))
def test_fuzz(fuzz_target, phase):
    target, gw = fuzz_target
    key, mode, examples = PHASES[phase]
    schema = load_schema(target.base)
    stats, failures, start = Stats(), [], time.monotonic()
    operations = [r.ok() for r in schema.get_all_operations()]
    for op in operations:
        try:
            fuzz_operation(target, op, key, mode, examples, stats)
        except Exception as e:  # collect every operation's failure, then report them all
            inner = "".join(f"\n    {type(x).__name__}: {str(x).strip()[:600]}" for x in getattr(e, "exceptions", ()))
            failures.append(f"{op.label}: {type(e).__name__}: {str(e).strip()[:1500]}{inner}")
    seconds = time.monotonic() - start
    print(f"\nfuzz {phase}: {len(operations)} operations, {stats.cases} cases in {seconds:.0f} s, "
          f"{stats.server_errors} 5xx (+{stats.upstream_errors} dead-upstream 502/503/504), "
          f"statuses {dict(sorted(stats.statuses.items()))}")
    assert not failures, f"{len(failures)} operation(s) failed:\n\n" + "\n\n".join(failures)
    assert stats.server_errors == 0
    assert gw.proc is not None and gw.proc.poll() is None  # the gateway survived
    assert stats.cases >= len(operations) * 3
