"""Bench helpers: local models, a gateway in a subprocess (this tree or any git revision), load generators."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "bench-admin"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tokenizer(vocab: int) -> Any:
    import pydoc_data.topics

    from experts.hf.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(list(pydoc_data.topics.topics.values()), vocab_size=vocab)


def build_gpt2(out: Path, tok: Any, *, layers: int, embd: int, heads: int, positions: int, seed: int) -> Path:
    """A random-initialised GPT-2 with the tokenizer, as an HF directory (speed does not depend on weights)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=layers, n_embd=embd, n_head=heads, vocab_size=len(tok), n_positions=positions,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def randomize_lora(peft_model: Any, generator: Any, b_scale: float) -> None:
    """Random LoRA factors in place: A ~ N(0, 1/fan_in), B ~ N(0, b_scale^2) (an adapter that changes the model)."""
    import torch

    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(b_scale * torch.randn(p.shape, generator=generator))


def checkout(ref: str, dest: Path) -> Path:
    """The tree of git revision `ref` in `dest` (git archive: no worktree, no history)."""
    data = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True).stdout
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


@dataclass
class GatewayProc:
    """`mergegate serve` from `source` (a source tree) on a fresh data dir."""

    source: Path
    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN}"}

    def start(self) -> GatewayProc:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "MERGEGATE_ADMIN_KEY": ADMIN, "MERGEGATE_LOG_LEVEL": "warning",
               "PYTHONPATH": str(self.source), **self.env}
        self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(self.port),
                                      "--data-dir", str(self.data_dir)], cwd=self.source, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway from {self.source} exited with {self.proc.returncode}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("gateway did not start")

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(self.base + path, json=body, headers=self.admin, timeout=600)
        r.raise_for_status()
        return r.json()

    def register(self, expert_id: str, path: Path) -> None:
        self.post("/admin/experts", {"id": expert_id, "path": str(path)})
        self.post(f"/admin/experts/{expert_id}/pin", {"pinned": True})

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


@dataclass
class LoadResult:
    seconds: float
    latencies: list[float]
    tokens: int
    by_prompt_len: list[tuple[int, float]]  # (prompt tokens, latency)

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds


async def _post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: bytes, path: bytes,
                body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 POST on a kept-alive connection: (status, body); Content-Length or chunked answers."""
    writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path, host, len(body), body))
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:] if ln)}
    if b"content-length" in fields:
        return status, await reader.readexactly(int(fields[b"content-length"]))
    chunks = []
    while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)) > 0:
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)
    await reader.readuntil(b"\r\n")
    return status, b"".join(chunks)


async def load(base: str, bodies: list[dict[str, Any]], concurrency: int) -> LoadResult:
    """Send `bodies` with `concurrency` clients, each sending its next request when the last one answered.

    Each client is one kept-alive HTTP/1.1 connection driven by a minimal request writer and response
    reader, not httpx: httpx's async client costs ~3 ms of CPU per request, which at concurrency 32 on a
    2-core machine is 0.3 of the cores the gateway under test then lacks."""
    url = httpx.URL(base)
    host = f"{url.host}:{url.port}".encode()
    queue = list(reversed(bodies))
    latencies: list[float] = []
    by_len: list[tuple[int, float]] = []
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        reader, writer = await asyncio.open_connection(url.host, url.port)
        try:
            while queue:
                payload = json.dumps(queue.pop()).encode()
                t0 = time.perf_counter()
                status, raw = await _post(reader, writer, host, b"/v1/completions", payload)
                dt = time.perf_counter() - t0
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {raw[:300]!r}")
                usage = json.loads(raw)["usage"]
                latencies.append(dt)
                tokens += usage["completion_tokens"]
                by_len.append((usage["prompt_tokens"], dt))
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - t0
    return LoadResult(seconds, latencies, tokens, by_len)


def run_load(base: str, bodies: list[dict[str, Any]], concurrency: int) -> LoadResult:
    return asyncio.run(load(base, bodies, concurrency))


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
