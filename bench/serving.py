"""Serving overhead: gateway /v1/completions vs the same generation code called in-process.

Same local model, same prompt, 64 new tokens (greedy, so both produce identical text), measured in
one run. Also requests/s at concurrency 1, 4, 16 and /health latency under that load.

    .venv/bin/python bench/serving.py [--requests 60] [--layers 2 --embd 128]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPT = "def read_config(path):\n    "


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def build_model(out: Path, layers: int, embd: int) -> Path:
    import pydoc_data.topics

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from experts.hf.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(list(pydoc_data.topics.topics.values()), vocab_size=2048)
    cfg = GPT2Config(n_layer=layers, n_embd=embd, n_head=4, vocab_size=len(tok), n_positions=256,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def in_process(model_dir: Path, n: int) -> tuple[list[float], str]:
    from experts.base import GenerationParams
    from experts.hf.engine.sync import generate
    from experts.hf.loading import load_hf_model

    m = load_hf_model(model_dir)
    params = GenerationParams(max_tokens=64, temperature=0)
    for _ in range(3):
        generate(m.model, m.tokenizer, PROMPT, params)
    times, text = [], ""
    for _ in range(n):
        t0 = time.perf_counter()
        text = generate(m.model, m.tokenizer, PROMPT, params).choices[0].text
        times.append(time.perf_counter() - t0)
    return times, text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load_test(base: str, concurrency: int, total: int) -> tuple[float, list[float]]:
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": 64, "temperature": 0}
    health: list[float] = []
    done = asyncio.Event()
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=httpx.Limits(max_connections=64)) as c:
        queue = list(range(total))

        async def worker() -> None:
            while queue:
                queue.pop()
                r = await c.post("/v1/completions", json=body)
                r.raise_for_status()

        async def prober() -> None:
            while not done.is_set():
                t0 = time.perf_counter()
                (await c.get("/health")).raise_for_status()
                health.append(time.perf_counter() - t0)
                await asyncio.sleep(0.05)

        probe = asyncio.create_task(prober())
        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        elapsed = time.perf_counter() - t0
        done.set()
        await probe
    return total / elapsed, health


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--embd", type=int, default=128)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mg-bench-"))
    model_dir = build_model(tmp / "model", args.layers, args.embd)
    port = free_port()
    env = {**os.environ, "MERGEGATE_ADMIN_KEY": "bench", "MERGEGATE_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--data-dir",
                             str(tmp / "data")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        admin = {"Authorization": "Bearer bench"}
        httpx.post(base + "/admin/experts", json={"id": "bench", "path": str(model_dir)}, headers=admin,
                   timeout=120).raise_for_status()
        httpx.post(base + "/admin/experts/bench/pin", json={"pinned": True}, headers=admin, timeout=120)
        body = {"model": "bench", "prompt": PROMPT, "max_tokens": 64, "temperature": 0}
        gw_times, gw_text = [], ""
        with httpx.Client(base_url=base, timeout=120) as c:
            for _ in range(3):
                c.post("/v1/completions", json=body)
            for _ in range(args.requests):
                t0 = time.perf_counter()
                r = c.post("/v1/completions", json=body)
                gw_times.append(time.perf_counter() - t0)
                gw_text = r.json()["choices"][0]["text"]
        ip_times, ip_text = in_process(model_dir, args.requests)
        assert gw_text == ip_text, "gateway and in-process outputs differ"
        print(f"model: GPT-2 {args.layers} layers x {args.embd}, 64 new tokens, {args.requests} requests each\n")
        print(f"{'':22s}{'p50 ms':>10s}{'p99 ms':>10s}")
        print(f"{'in-process generate':22s}{pct(ip_times, 50) * 1e3:10.2f}{pct(ip_times, 99) * 1e3:10.2f}")
        print(f"{'gateway /v1/completions':22s}{pct(gw_times, 50) * 1e3:10.2f}{pct(gw_times, 99) * 1e3:10.2f}")
        over50 = (pct(gw_times, 50) - pct(ip_times, 50)) * 1e3
        print(f"{'added by the gateway':22s}{over50:10.2f}{(pct(gw_times, 99) - pct(ip_times, 99)) * 1e3:10.2f}"
              f"   (ratio p50 {pct(gw_times, 50) / pct(ip_times, 50):.3f}x; target: <= 5 ms p50)\n")
        print(f"{'concurrency':>11s}{'req/s':>9s}{'in-proc req/s':>15s}{'ratio':>8s}{'/health p99 ms':>16s}")
        ip_rps = 1 / statistics.mean(ip_times)
        for conc in (1, 4, 16):
            rps, health = asyncio.run(load_test(base, conc, max(24, conc * 4)))
            print(f"{conc:11d}{rps:9.1f}{ip_rps:15.1f}{rps / ip_rps:8.2f}{pct(health, 99) * 1e3:16.1f}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
