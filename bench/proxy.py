"""Proxy overhead: MergeGate's remote-expert proxy vs LiteLLM's proxy vs calling the upstream directly.

One run starts, on 127.0.0.1:
  * a minimal fast OpenAI-compatible upstream (a raw ASGI app on uvicorn + httptools + uvloop) that
    answers /v1/chat/completions with a fixed completion, or with a fixed SSE stream of 8 chunks, at once;
  * MergeGate (`mergegate serve`) with that upstream registered as the remote expert `x`;
  * LiteLLM's proxy (`litellm --config cfg.yaml`, from its own venv .venv-litellm) with `x` -> the upstream,
and measures, with the same load generator (raw asyncio HTTP/1.1 on keep-alive connections, in this
process), at concurrency 1 and 32:
  * non-streamed: latency of the whole answer; streamed: time to the first SSE event (TTFB);
  * added latency = proxy p50/p99 minus direct p50/p99 (the upstream's own time cancels out);
  * memory: the RSS of each proxy's processes before and after `--memory-requests` requests (after warm-up).

Each target and scenario gets up to --requests-c1/--requests-c32 requests or --max-s-c1/--max-s-c32
seconds, whichever ends first (LiteLLM is the slow one); the memory runs ask for 10,000 requests each
and stop at --memory-max-s / --litellm-memory-max-s (the table reports how many were made).

    .venv/bin/python bench/proxy.py                      # the whole thing, < 5 minutes on 2 cores
    .venv/bin/python bench/proxy.py --quick              # fewer requests
    .venv/bin/python bench/proxy.py --no-litellm         # MergeGate vs direct only

LiteLLM is a bench-only dependency in a separate venv so that its pins never touch MergeGate's:
    python3 -m venv .venv-litellm && .venv-litellm/bin/pip install 'litellm[proxy]==1.106.12'
(1.106.12 is pinned on purpose: a later release, 1.107.0, was reported compromised and withdrawn.) It runs offline
with LITELLM_TELEMETRY=False and LITELLM_LOCAL_MODEL_COST_MAP=True and no database; it refuses to
start without a master key, so both proxies get the same client key (MergeGate as MERGEGATE_API_KEYS)
and every request carries it (the upstream ignores it).
Results go to bench/out/proxy.json and are printed as a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LITELLM = ROOT / ".venv-litellm" / "bin" / "litellm"
MODEL = "x"
ADMIN_KEY = "bench-admin-key"
# Both proxies authenticate clients with this key (LiteLLM refuses to start without a master key).
CLIENT_KEY = "sk-bench-" + os.urandom(16).hex()

# -- the fast upstream -----------------------------------------------------------------------------------
ANSWER = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the fast upstream!"},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}).encode()


def _chunk(delta: dict, finish: str | None) -> bytes:
    return b"data: " + json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}).encode() + b"\n\n"


STREAM = ([_chunk({"role": "assistant", "content": ""}, None)]
          + [_chunk({"content": w}, None) for w in ("Hello", " from", " the", " fast", " upstream", "!")]
          + [_chunk({}, "stop"), b"data: [DONE]\n\n"])
MODELS = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                                  "owned_by": "bench"}]}).encode()


async def upstream_app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    more = True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    if scope["method"] == "GET":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": MODELS})
        return
    stream = b'"stream":true' in body.replace(b" ", b"")
    if not stream:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": ANSWER})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
    for ev in STREAM:
        await send({"type": "http.response.body", "body": ev, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def serve_upstream(port: int) -> None:
    import uvicorn

    uvicorn.run(upstream_app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                http="httptools", loop="uvloop", lifespan="on")


# -- processes ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, path: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early (rc {proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"no answer on port {port} within {timeout}s:\n{log.read_text()[-3000:]}")


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def rss_bytes(self) -> int:
        """RSS of the process and all its descendants (LiteLLM may run workers as children)."""
        return sum(_rss(p) for p in [self.proc.pid, *_descendants(self.proc.pid)])


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def spawn(name: str, cmd: list[str], env: dict[str, str], workdir: Path,
          cwd: Path = ROOT) -> tuple[subprocess.Popen, Path]:
    log = workdir / f"{name}.log"
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, log


def start_upstream(workdir: Path) -> Server:
    port = free_port()
    proc, log = spawn("upstream", [sys.executable, str(Path(__file__).resolve()), "--serve-upstream", str(port)],
                      dict(os.environ), workdir)
    wait_http(port, "/v1/models", proc, 30, log)
    return Server("upstream", port, proc, log)


def start_mergegate(workdir: Path, upstream: Server) -> Server:
    import httpx

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MERGEGATE_ADMIN_KEY": ADMIN_KEY, "MERGEGATE_API_KEYS": CLIENT_KEY,
           "MERGEGATE_LOG_LEVEL": "warning"}
    proc, log = spawn("mergegate", [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--data-dir",
                                    str(workdir / "mg-data")], env, workdir)
    server = Server("MergeGate", port, proc, log)
    try:
        wait_http(port, "/health", proc, 120, log)
        r = httpx.post(f"http://127.0.0.1:{port}/admin/experts/remote", timeout=30,
                       headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                       json={"id": MODEL, "base_url": f"http://127.0.0.1:{upstream.port}/v1", "model": MODEL,
                             "check": True, "max_concurrency": 256})
        if r.status_code != 201:
            raise RuntimeError(f"registering the remote expert failed: {r.status_code} {r.text}")
    except BaseException:
        server.stop()
        raise
    return server


def litellm_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LITELLM_"))}
    env.update(LITELLM_TELEMETRY="False", LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR",
               LITELLM_MASTER_KEY=CLIENT_KEY,
               LITELLM_MODE="PRODUCTION", NO_DOCS="True", DISABLE_ADMIN_UI="True", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def start_litellm(workdir: Path, upstream: Server) -> Server:
    port = free_port()
    cfg = workdir / "litellm.yaml"
    cfg.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: http://127.0.0.1:{upstream.port}/v1\n"
        "      api_key: dummy\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  drop_params: true\n"
        "  turn_off_message_logging: true\n"
        "general_settings:\n"
        "  disable_spend_logs: true\n")
    proc, log = spawn("litellm", [str(LITELLM), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)],
                      litellm_env(), workdir, cwd=workdir)
    server = Server("LiteLLM", port, proc, log)
    try:
        wait_http(port, "/health/liveliness", proc, 180, log)
    except BaseException:
        server.stop()
        raise
    return server


# -- the load generator: raw HTTP/1.1 keep-alive ------------------------------------------------------------
class Conn:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, float, float, bytes]:
        """(status, seconds to the first body byte, seconds to the end, body)."""
        if self.writer is None:
            await self._open()
        assert self.reader is not None and self.writer is not None
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {CLIENT_KEY}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        t0 = time.perf_counter()
        self.writer.write(head + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        first = None
        out = bytearray()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                data = await self.reader.readexactly(size + 2)
                if first is None:
                    first = time.perf_counter()
                out += data[:-2]
        else:
            n = int(headers.get("content-length", "0"))
            data = await self.reader.readexactly(n) if n else b""
            first = time.perf_counter()
            out += data
        t1 = time.perf_counter()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, (first or t1) - t0, t1 - t0, bytes(out)


@dataclass
class Sample:
    ttfb: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    errors: int = 0
    wall: float = 0.0


def body_for(stream: bool) -> bytes:
    b = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16}
    if stream:
        b["stream"] = True
    return json.dumps(b).encode()


def valid(status: int, body: bytes, stream: bool) -> bool:
    if status != 200:
        return False
    if stream:
        return body.rstrip().endswith(b"data: [DONE]") and b"fast" in body
    return b"Hello from the fast upstream!" in body


async def load(port: int, stream: bool, concurrency: int, n: int, max_s: float = float("inf")) -> Sample:
    """n requests (or as many as start within max_s seconds) over `concurrency` keep-alive connections."""
    body = body_for(stream)
    sample = Sample()
    left = [n]
    deadline = time.perf_counter() + max_s

    async def worker() -> None:
        conn = Conn(port)
        try:
            while left[0] > 0 and time.perf_counter() < deadline:
                left[0] -= 1
                try:
                    status, ttfb, total, data = await conn.post("/v1/chat/completions", body)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    sample.errors += 1
                    conn.close()
                    continue
                if not valid(status, data, stream):
                    sample.errors += 1
                    continue
                sample.ttfb.append(ttfb)
                sample.total.append(total)
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    sample.wall = time.perf_counter() - t0
    return sample


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# -- the run -------------------------------------------------------------------------------------------------
SCENARIOS = [("non-streamed", False, 1), ("non-streamed", False, 32), ("streamed TTFB", True, 1),
             ("streamed TTFB", True, 32)]


def measure(targets: dict[str, int], counts: dict[int, int], caps: dict[int, float], warmup: int
            ) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for label, stream, c in SCENARIOS:
        key = f"{label} c={c}"
        results[key] = {}
        for name, port in targets.items():
            asyncio.run(load(port, stream, c, warmup, max_s=2.0))
            s = asyncio.run(load(port, stream, c, counts[c], max_s=caps[c]))
            xs = s.ttfb if stream else s.total
            results[key][name] = {"p50_ms": pct(xs, 50) * 1000, "p99_ms": pct(xs, 99) * 1000,
                                  "mean_ms": statistics.fmean(xs) * 1000 if xs else float("nan"),
                                  "n": len(xs), "errors": s.errors, "rps": len(xs) / s.wall if s.wall else 0.0}
            r = results[key][name]
            print(f"  {key:22s} {name:10s} p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:7.3f} ms  "
                  f"{r['rps']:7.0f} req/s  n={r['n']} errors={r['errors']}", flush=True)
    return results


def memory(server: Server, n: int, warmup: int, max_s: float, checkpoints: int = 5) -> dict:
    """RSS before and after n requests (half streamed, at concurrency 32; fewer if max_s runs out),
    after a warm-up of the same mix."""
    asyncio.run(load(server.port, False, 32, warmup // 2, max_s=5))
    asyncio.run(load(server.port, True, 32, warmup // 2, max_s=5))
    time.sleep(0.5)
    before = server.rss_bytes()
    trace = [before]
    errors = done = 0
    per = max(2, n // checkpoints)
    t0 = time.perf_counter()
    while done < n:
        left_s = max_s - (time.perf_counter() - t0)
        if left_s <= 0:
            break
        k = min(per, n - done)
        a = asyncio.run(load(server.port, False, 32, k // 2, max_s=left_s / 2))
        b = asyncio.run(load(server.port, True, 32, k - k // 2, max_s=left_s / 2))
        errors += a.errors + b.errors
        done += len(a.total) + len(b.total) + a.errors + b.errors
        trace.append(server.rss_bytes())
    wall = time.perf_counter() - t0
    after = trace[-1]
    return {"requests": done, "asked": n, "errors": errors, "rss_before_mb": before / 2**20,
            "rss_after_mb": after / 2**20, "growth_mb": (after - before) / 2**20,
            "growth_bytes_per_request": (after - before) / max(done, 1),
            "trace_mb": [round(x / 2**20, 2) for x in trace], "seconds": wall}


def table(results: dict[str, dict], mem: dict[str, dict], names: list[str]) -> str:
    proxies = [n for n in names if n != "direct"]
    head = "| scenario | direct p50 / p99 ms |" + "".join(f" {p} p50 / p99 ms (added) |" for p in proxies)
    if "LiteLLM" in proxies and "MergeGate" in proxies:
        head += " MergeGate added / LiteLLM added p50, p99 |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, row in results.items():
        d = row["direct"]
        cells = [f"| {key} | {d['p50_ms']:.2f} / {d['p99_ms']:.2f} |"]
        added = {}
        for p in proxies:
            r = row[p]
            a50, a99 = r["p50_ms"] - d["p50_ms"], r["p99_ms"] - d["p99_ms"]
            added[p] = (a50, a99)
            r["added_p50_ms"], r["added_p99_ms"] = a50, a99
            cells.append(f" {r['p50_ms']:.2f} / {r['p99_ms']:.2f} (+{a50:.2f} / +{a99:.2f}) |")
        if "LiteLLM" in added and "MergeGate" in added:
            (m50, m99), (l50, l99) = added["MergeGate"], added["LiteLLM"]
            r50 = m50 / l50 if l50 > 0 else float("nan")
            r99 = m99 / l99 if l99 > 0 else float("nan")
            row["ratio_added_p50"], row["ratio_added_p99"] = r50, r99
            cells.append(f" {r50:.2f}, {r99:.2f} |")
        lines.append("".join(cells))
    if mem:
        lines += ["", "| memory | requests | RSS before MB | RSS after MB | growth MB | bytes/request |",
                  "|---|---|---|---|---|---|"]
        for p, m in mem.items():
            lines.append(f"| {p} | {m['requests']} | {m['rss_before_mb']:.1f} | {m['rss_after_mb']:.1f} | "
                         f"{m['growth_mb']:+.2f} | {m['growth_bytes_per_request']:+.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    ap.add_argument("--no-litellm", action="store_true", help="MergeGate vs direct only")
    ap.add_argument("--requests-c1", type=int, default=400, help="per target and scenario (capped by --max-s-c1)")
    ap.add_argument("--requests-c32", type=int, default=3200, help="(capped by --max-s-c32)")
    ap.add_argument("--max-s-c1", type=float, default=5.0, help="seconds at most per target and scenario, c=1")
    ap.add_argument("--max-s-c32", type=float, default=8.0, help="seconds at most per target and scenario, c=32")
    ap.add_argument("--memory-requests", type=int, default=10_000)
    ap.add_argument("--memory-max-s", type=float, default=100.0,
                    help="seconds at most for MergeGate's memory run (10,000 requests take ~80 s on 2 busy cores)")
    ap.add_argument("--litellm-memory-max-s", type=float, default=60.0,
                    help="seconds at most for LiteLLM's memory run (it is slower: the count made is reported)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "proxy.json")
    args = ap.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return
    if args.quick:
        args.requests_c1, args.requests_c32, args.memory_requests = 100, 640, 1000
        args.max_s_c1, args.max_s_c32, args.memory_max_s, args.litellm_memory_max_s = 3.0, 4.0, 20.0, 20.0
    counts = {1: args.requests_c1, 32: args.requests_c32}
    caps = {1: args.max_s_c1, 32: args.max_s_c32}
    warmup = 50
    workdir = Path(tempfile.mkdtemp(prefix="mg-proxy-bench-"))
    servers: list[Server] = []
    t_start = time.perf_counter()
    litellm_note = None
    try:
        up = start_upstream(workdir)
        servers.append(up)
        mg = start_mergegate(workdir, up)
        servers.append(mg)
        targets = {"direct": up.port, "MergeGate": mg.port}
        ll = None
        if args.no_litellm:
            litellm_note = "skipped (--no-litellm)"
        elif not LITELLM.exists():
            litellm_note = (f"not installed: {LITELLM} is missing (python3 -m venv .venv-litellm && "
                            ".venv-litellm/bin/pip install 'litellm[proxy]==1.106.12')")
        else:
            try:
                ll = start_litellm(workdir, up)
                servers.append(ll)
                targets["LiteLLM"] = ll.port
            except RuntimeError as e:
                litellm_note = f"failed to start: {e}"
        if litellm_note:
            print(f"LiteLLM: {litellm_note}", flush=True)
        print(f"started in {time.perf_counter() - t_start:.1f}s; measuring {list(targets)} (c=1: {counts[1]} "
              f"requests or {caps[1]:g}s, c=32: {counts[32]} or {caps[32]:g}s, after a warm-up)", flush=True)
        results = measure(targets, counts, caps, warmup)
        mem = {}
        for s in [mg] + ([ll] if ll else []):
            cap = args.memory_max_s if s is mg else args.litellm_memory_max_s
            mem[s.name] = memory(s, args.memory_requests, warmup=500, max_s=cap)
            m = mem[s.name]
            print(f"  memory {s.name}: {m['requests']} of {m['asked']} requests in {m['seconds']:.1f}s, "
                  f"RSS {m['trace_mb']} MB, errors={m['errors']}", flush=True)
        text = table(results, mem, list(targets))
        print()
        print(text)
        out = {"results": results, "memory": mem, "litellm": litellm_note or "1.106.12", "counts": counts,
               "caps_s": caps,
               "seconds": time.perf_counter() - t_start, "table": text}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))
        print(f"\nwall {out['seconds']:.0f}s; results in {args.out}")
    finally:
        for s in reversed(servers):
            s.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
