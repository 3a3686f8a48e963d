"""Crash injection: `kill -9` the gateway while jobs are at chosen points, restart, and check that nothing
is lost and nothing is half done.

Each crash point is reached through the job's own progress: the gateway runs with
`MERGEGATE_FAULT_PAUSE` (app/services/faults.py), which stops a job of a given kind at its first
progress message containing a given text; the test polls `GET /admin/jobs/{id}` until the job is
there, then kills the process (SIGKILL). One data dir goes through three rounds, each round's
restart checking the one before:

* round 0: an upload whose body is half received; an upload job staged and about to register; a
  merge with three tensors written; a LoRA training job mid-training; an Evo-Merging search mid-search.
* round 1: a merge with its output complete in staging, about to register; a LoRA training job about
  to save its adapter; a BTM pipeline in its second domain (seed and first expert registered).
* round 2: the same pipeline request resumes from the stages it registered; the gateway is then
  restarted against another registry database: it refuses, and every file stays in place.

After every restart: each interrupted job is failed with a reason, none of their experts exists,
staging is empty, no orphan appeared, SQLite's `PRAGMA integrity_check` is ok, and every expert
registered before answers a seeded request exactly as before.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import Gateway, build_adapter_dir, build_model_dir

EXAMPLES = [
    {"prompt": "def add(a, b):\n", "completion": "    return a + b"},
    {"prompt": "Lists are", "completion": " mutable sequences."},
    {"text": "The with statement wraps the execution of a block with methods defined by a context manager."},
]
ENV = {"MERGEGATE_JOB_WORKERS": "4", "MERGEGATE_MAX_CONCURRENT_UPLOADS": "4", "MERGEGATE_CORPUS_BYTES": "120000"}
PIPELINE = {"prefix": "p", "domains": ["code", "python_docs"],
            "budget": {"max_tokens": 8 * 32 * 12, "batch_size": 8, "seq_len": 32, "lr": 0.003},
            "size": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64, "vocab_size": 384}}
LORA_TRAIN = {"base": "base", "data": {"examples": EXAMPLES}, "lora": {"r": 2, "lora_alpha": 4},
              "budget": {"max_tokens": 2000, "batch_size": 2, "seq_len": 32}}
SEARCH = {"base": "base", "pool": ["lora-a", "lora-b"], "validation": {"examples": EXAMPLES}, "seed": 3,
          "budget_stage1": 12, "budget_stage2": 12, "popsize": 4, "sigma0": 0.2}


def complete(gw: Gateway, model: str) -> str:
    r = httpx.post(gw.base + "/v1/completions", timeout=60,
                   json={"model": model, "prompt": "def f(x):", "max_tokens": 10, "seed": 11, "temperature": 0.9})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def start(data: Path, fault: str | None = None) -> Gateway:
    return Gateway(data, extra_env={**ENV, **({"MERGEGATE_FAULT_PAUSE": fault} if fault else {})}).start()


def submit(c: httpx.Client, path: str, **kw) -> str:
    r = c.post(path, params={"background": "true"}, **kw)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait_paused(c: httpx.Client, job_id: str, text: str, timeout: float = 240) -> dict:
    """Poll the job until its progress message shows it reached the crash point."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/admin/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running"), job
        if text in (job["message"] or ""):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {text!r}")


def integrity_ok(data: Path) -> None:
    with sqlite3.connect(data / "registry.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(("registry.db", "gateway-"))}


class HalfUpload:
    """A multipart upload that sends half of its archive, then waits (for ever, or until the gateway dies)."""

    def __init__(self, gw: Gateway, expert_id: str, size: int = 3 << 20) -> None:
        boundary = uuid.uuid4().hex
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"id\"\r\n\r\n{expert_id}\r\n--{boundary}"
                "\r\nContent-Disposition: form-data; name=\"archive\"; filename=\"m.tar\"\r\n\r\n").encode()
        self.stop = threading.Event()

        def body() -> Iterator[bytes]:
            yield head + b"\1" * size
            self.stop.wait(300)

        def send() -> None:
            try:
                httpx.post(gw.base + "/admin/experts/upload", content=body(), timeout=300,
                           headers={**gw.admin_headers, "Content-Type": f"multipart/form-data; boundary={boundary}"})
            except httpx.HTTPError:
                pass  # the gateway was killed under it

        self.thread = threading.Thread(target=send, daemon=True)
        self.thread.start()


def check_after_crash(gw: Gateway, jobs: dict[str, str], expected: set[str], answers: dict[str, str]) -> None:
    data = gw.data_dir
    with gw.admin() as c:
        for job_id, expert_id in jobs.items():
            job = c.get(f"/admin/jobs/{job_id}").json()
            assert job["status"] == "failed" and "interrupted" in job["error"], job
            assert c.get(f"/admin/experts/{expert_id}").status_code == 404  # nothing half registered
        experts = c.get("/admin/experts").json()["data"]
        assert {e["id"] for e in experts} == expected
        assert all(e["status"] == "ready" for e in experts)
        assert c.get("/admin/orphans").json()["data"] == []  # no artifact was left without its row
    assert sorted(p.name for p in (data / "experts").iterdir()) == sorted(
        Path(e["path"]).name for e in experts if e["path"])
    assert list((data / "staging").iterdir()) == []  # no debris
    integrity_ok(data)
    for model, text in answers.items():
        assert complete(gw, model) == text, model  # every earlier expert answers exactly as before


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crash")
    base = build_model_dir(root / "base", tokenizer=tokenizer, seed=1)
    other = build_model_dir(root / "other", tokenizer=tokenizer, seed=2)
    return {"root": root, "base": base, "other": other,
            "lora-a": build_adapter_dir(root / "lora-a", base, seed=3, rank=2),
            "lora-b": build_adapter_dir(root / "lora-b", base, seed=4, rank=2)}


def test_kill_9_at_every_stage_loses_nothing(dirs):
    data = dirs["root"] / "data"
    answers: dict[str, str] = {}

    # -- round 0 -------------------------------------------------------------------------------
    gw = start(data, "register_upload:registering;merge:tensor 3/;lora.train:: step ;search.evo_merging:4/24 queries")
    try:
        for eid in ("base", "other"):
            gw.register(eid, dirs[eid])
        for eid in ("lora-a", "lora-b"):
            gw.register(eid, dirs[eid], base="base")
        answers = {eid: complete(gw, eid) for eid in ("base", "other", "lora-a")}
        files = [("files", (p.name, p.read_bytes())) for p in sorted(dirs["other"].iterdir()) if p.is_file()]
        with gw.admin() as c:
            jobs = {
                submit(c, "/admin/experts/upload", data={"id": "up-1"}, files=files): "up-1",
                submit(c, "/admin/merges", json={"id": "m-1", "recipe": {"method": "linear", "experts": [
                    {"id": "base", "weight": 0.5}, {"id": "other", "weight": 0.5}]}}): "m-1",
                submit(c, "/admin/loras/train", json={"id": "t-1", **LORA_TRAIN}): "t-1",
                submit(c, "/admin/searches", json={"name": "s-1", **SEARCH}): "s-1",
            }
            points = {"up-1": "registering", "m-1": "tensor 3/", "t-1": ": step ", "s-1": "4/24 queries"}
            for job_id, eid in jobs.items():
                wait_paused(c, job_id, points[eid])
            half = HalfUpload(gw, "up-half")
            deadline = time.monotonic() + 60
            while not any(p.is_file() and p.stat().st_size >= 1 << 20 for p in (data / "staging").iterdir()):
                assert time.monotonic() < deadline, "the half upload never reached the disk"
                time.sleep(0.05)
            assert len(list((data / "staging").iterdir())) >= 3  # debris to come: uploads and the merge's output
    finally:
        gw.stop(kill=True)
    half.stop.set()
    integrity_ok(data)  # the database as the crash left it

    # -- round 1 -------------------------------------------------------------------------------
    gw = start(data, "merge:registering;lora.train:saving the adapter;btm.pipeline:[python_docs]")
    try:
        check_after_crash(gw, jobs, {"base", "other", "lora-a", "lora-b"}, answers)
        with gw.admin() as c:
            assert c.get("/admin/experts/up-half").status_code == 404
            jobs = {
                submit(c, "/admin/merges", json={"id": "m-2", "recipe": {"method": "linear", "experts": [
                    {"id": "base", "weight": 0.3}, {"id": "other", "weight": 0.7}]}}): "m-2",
                submit(c, "/admin/loras/train", json={"id": "t-2", **LORA_TRAIN}): "t-2",
                submit(c, "/admin/btm/pipeline", json=PIPELINE): "p-python_docs",
            }
            points = {"m-2": "registering", "t-2": "saving the adapter", "p-python_docs": "[python_docs]"}
            for job_id, eid in jobs.items():
                wait_paused(c, job_id, points[eid])
            assert list((data / "staging").iterdir())  # the merge's complete output, not yet registered
    finally:
        gw.stop(kill=True)
    integrity_ok(data)

    # -- round 2 -------------------------------------------------------------------------------
    gw = start(data)
    try:
        finished = {"base", "other", "lora-a", "lora-b", "p-seed", "p-code"}  # the pipeline's finished stages
        interrupted = {j: e for j, e in jobs.items() if e != "p-python_docs"}
        check_after_crash(gw, interrupted, finished, answers)  # the paper protocol: experts resume the seed, no branch
        answers.update({eid: complete(gw, eid) for eid in ("p-seed", "p-code")})
        with gw.admin() as c:
            pipeline_job = next(j for j, e in jobs.items() if e == "p-python_docs")
            job = c.get(f"/admin/jobs/{pipeline_job}").json()
            assert job["status"] == "failed" and "interrupted" in job["error"]
            r = c.post("/admin/btm/pipeline", params={"background": "false"}, json=PIPELINE)  # resumes
            assert r.status_code == 200, r.text
            assert r.json()["result"]["resumed"] == ["p-seed", "p-code"]
            ids = {e["id"] for e in c.get("/admin/experts").json()["data"]}
            assert ids == finished | {"p-python_docs", "p-forest", "p-average"}
            r = c.post("/admin/btm/pipeline", json={**PIPELINE, "seed_fraction": 0.25})
            assert r.status_code == 409 and "'p-seed' already exists" in r.json()["error"]["message"]
        for model, text in answers.items():
            assert complete(gw, model) == text, model
    finally:
        gw.stop(kill=True)
    integrity_ok(data)

    # -- a mismatched registry: refused, nothing deleted ----------------------------------------
    before = tree(data)
    wrong = Gateway(data, extra_env={**ENV, "MERGEGATE_DATABASE_URL": f"sqlite:///{dirs['root'] / 'other.db'}"})
    with pytest.raises(RuntimeError, match="exited early"):
        wrong.start()
    assert "refusing to start" in wrong.log.read_text()
    assert tree(data) == before
