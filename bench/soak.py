"""Soak: bounded load with disconnects and uploads against one gateway; does anything grow or fail?

Each round sends, against a `mergegate serve` subprocess on a fresh data dir with a small local GPT-2:
completions at concurrency 16 (some with n=2, some streamed to the end), streams cut after a few events,
non-streamed requests abandoned by a client timeout, uploads that complete (then deleted) and uploads cut
mid-body. It reports req/s, p50/p99, errors (any 5xx, or a failure of a request that was not cut), and the
gateway's RSS, threads and open fds before the first round, after the first (warm) round and at the end,
plus what the engine holds once idle (queued and running rows: 0 when cut requests freed their slots) and
the staging area (empty when cut uploads left no debris).

    .venv/bin/python bench/soak.py --rounds 10 --scale 4 --json bench/out/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gateways import ROOT, GatewayProc, build_gpt2, build_tokenizer, pct

PROMPTS = ["def fib(n):", "The quick brown fox", "import os\nimport sys\n", "class Node:", "for i in range(10):",
           "Return the sum of", "x = [1, 2, 3]\n", "while True:"]


def process_stats(pid: int) -> dict[str, float]:
    """RSS (MiB), threads and open file descriptors of a process (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mib": int(fields["VmRSS"].split()[0]) / 1024, "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def engine_state(gw: GatewayProc) -> dict[str, float]:
    """Queued prompts and running rows summed over models, from /metrics."""
    text = httpx.get(gw.base + "/metrics", headers=gw.admin, timeout=30).text
    out = {"queued": 0.0, "running": 0.0, "series": 0}
    for line in text.splitlines():
        for key, name in (("queued", "mergegate_engine_queue_prompts{"), ("running", "mergegate_engine_batch_rows{")):
            if line.startswith(name):
                out[key] += float(line.rsplit(" ", 1)[1])
                out["series"] += 1
    return out


class Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.requests = 0

    def fail(self, what: str) -> None:
        self.errors.append(what[:200])


async def completions(client: httpx.AsyncClient, tally: Tally, count: int, concurrency: int) -> None:
    todo = list(range(count))

    async def worker() -> None:
        while todo:
            i = todo.pop()
            body = {"model": "soak", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 24, "temperature": 0.8,
                    "seed": i, "n": 2 if i % 5 == 0 else 1}
            t0 = time.perf_counter()
            try:
                if i % 4 == 0:  # streamed to the end
                    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                        events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                    ok = r.status_code == 200 and events and events[-1] == "data: [DONE]"
                else:
                    r = await client.post("/v1/completions", json=body)
                    ok = r.status_code == 200 and len(r.json()["choices"]) == body["n"]
            except httpx.HTTPError as e:
                tally.fail(f"completion: {e!r}")
                continue
            tally.requests += 1
            tally.latencies.append(time.perf_counter() - t0)
            if not ok:
                tally.fail(f"completion {r.status_code}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def cut_streams(client: httpx.AsyncClient, tally: Tally, count: int) -> None:
    """Streams closed by the client after three events."""
    async def one(i: int) -> None:
        body = {"model": "soak", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 200, "stream": True}
        try:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code >= 500:
                    tally.fail(f"cut stream {r.status_code}")
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen >= 3:
                        break
        except httpx.HTTPError as e:
            tally.fail(f"cut stream: {e!r}")
        tally.requests += 1

    await asyncio.gather(*(one(i) for i in range(count)))


async def abandoned(base: str, tally: Tally, count: int) -> None:
    """Long non-streamed requests whose client gives up after 0.3 s (the gateway must cancel them)."""
    async with httpx.AsyncClient(base_url=base, timeout=0.3) as client:
        async def one(i: int) -> None:
            body = {"model": "soak", "prompt": [PROMPTS[i % len(PROMPTS)]] * 4, "max_tokens": 200, "n": 2}
            try:
                r = await client.post("/v1/completions", json=body)
                if r.status_code >= 500:
                    tally.fail(f"abandoned {r.status_code}")
            except httpx.TimeoutException:
                pass
            tally.requests += 1

        await asyncio.gather(*(one(i) for i in range(count)))


def model_tar(model_dir: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in sorted(model_dir.iterdir()):
            tar.add(p, arcname=p.name)
    return buf.getvalue()


def uploads(gw: GatewayProc, tally: Tally, archive: bytes, round_no: int, count: int) -> None:
    for i in range(count):
        expert_id = f"up-{round_no}-{i}"
        r = httpx.post(gw.base + "/admin/experts/upload", headers=gw.admin, data={"id": expert_id},
                       files={"archive": ("model.tar", archive, "application/x-tar")}, timeout=120)
        tally.requests += 1
        if r.status_code != 201:
            tally.fail(f"upload {r.status_code}: {r.text[:120]}")
            continue
        d = httpx.delete(gw.base + f"/admin/experts/{expert_id}", headers=gw.admin, timeout=60)
        if d.status_code != 200:
            tally.fail(f"delete {d.status_code}")


def cut_upload(gw: GatewayProc, archive: bytes, round_no: int) -> None:
    """A multipart upload that stops half-way and closes the connection."""
    boundary = "soakboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"id\"\r\n\r\ncut-{round_no}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"archive\"; filename=\"m.tar\"\r\n"
            "Content-Type: application/x-tar\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = len(head) + len(archive) + len(tail)
    request = (f"POST /admin/experts/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
               f"{gw.admin['Authorization'].split()[1]}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
               f"Content-Length: {length}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(request + head + archive[: len(archive) // 2])
        time.sleep(0.2)


async def one_round(gw: GatewayProc, tally: Tally, archive: bytes, round_no: int, scale: int) -> float:
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=gw.base, timeout=120, limits=limits) as client:
        await asyncio.gather(completions(client, tally, 48 * scale, 16), cut_streams(client, tally, 8 * scale),
                             abandoned(gw.base, tally, 4 * scale))
    await asyncio.to_thread(uploads, gw, tally, archive, round_no, 2)
    await asyncio.to_thread(cut_upload, gw, archive, round_no)
    return time.perf_counter() - t0


def settle(gw: GatewayProc, seconds: float = 15.0) -> dict[str, float]:
    """Wait (bounded) until the engine holds nothing, then return its state."""
    deadline = time.monotonic() + seconds
    state = engine_state(gw)
    while (state["queued"] or state["running"]) and time.monotonic() < deadline:
        time.sleep(0.5)
        state = engine_state(gw)
    return state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--scale", type=int, default=4, help="requests per round, in units (48 completions each)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mergegate-soak-"))
    tok = build_tokenizer(2048)
    model = build_gpt2(work / "model", tok, layers=2, embd=128, heads=4, positions=512, seed=0)
    archive = model_tar(model)
    gw = GatewayProc(ROOT, work / "data").start()
    try:
        gw.register("soak", model)
        asyncio.run(one_round(gw, Tally(), archive, -1, 1))  # warm-up: loads, first compiles, first upload
        before = process_stats(gw.proc.pid)
        tally, durations, marks = Tally(), [], []
        for i in range(args.rounds):
            seen = len(tally.latencies)
            durations.append(asyncio.run(one_round(gw, tally, archive, i, args.scale)))
            settle(gw)
            marks.append(process_stats(gw.proc.pid))
            p50 = pct(tally.latencies[seen:], 50) * 1e3
            print(f"round {i + 1}/{args.rounds}: {durations[-1]:.1f} s, completions p50 {p50:.0f} ms, "
                  f"load {os.getloadavg()[0]:.1f}, {marks[-1]}", flush=True)
        idle = settle(gw)
        after = process_stats(gw.proc.pid)
        debris = sorted(p.name for p in (work / "data" / "staging").iterdir())
        result: dict[str, Any] = {
            "rounds": args.rounds, "requests": tally.requests, "seconds": sum(durations),
            "rps": tally.requests / sum(durations), "p50_ms": pct(tally.latencies, 50) * 1e3,
            "p99_ms": pct(tally.latencies, 99) * 1e3, "errors": len(tally.errors), "error_samples": tally.errors[:5],
            "before": before, "after_first_round": marks[0], "after": after,
            "growth_after_warm_round": {k: after[k] - marks[0][k] for k in after},
            "rss_slope_mib_per_round": statistics.linear_regression(
                range(len(marks)), [m["rss_mib"] for m in marks]).slope if len(marks) > 1 else 0.0,
            "engine_when_idle": idle, "staging_debris": debris}
    finally:
        gw.stop()
    report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


def report(r: dict[str, Any]) -> None:
    print(f"\n{r['requests']} requests in {r['rounds']} rounds, {r['seconds']:.0f} s: {r['rps']:.1f} req/s, "
          f"completions p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, errors {r['errors']}")
    print(f"{'':22}{'before':>10}{'after round 1':>15}{'end':>10}{'end / round 1':>15}")
    for k in ("rss_mib", "threads", "fds"):
        b, m, a = r["before"][k], r["after_first_round"][k], r["after"][k]
        print(f"{k:22}{b:10.1f}{m:15.1f}{a:10.1f}{a / m:15.3f}")
    print(f"RSS slope over rounds: {r['rss_slope_mib_per_round']:+.2f} MiB/round; engine when idle: "
          f"{r['engine_when_idle']}; staging debris: {r['staging_debris'] or 'none'}")


if __name__ == "__main__":
    main()
