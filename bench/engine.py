"""The batching engine against the sequential gateway it replaced and against in-process `generate`.

Measured in one run on this machine, both gateways as subprocesses on the same model, the same
prompts and the same load generator:

* throughput (req/s, tok/s) and latency (p50, p99) at concurrency 1, 4, 16, 32, 64 of 32-token greedy
  completions of a demo-sized expert (GPT-2, 4 layers x 256, vocab 4096, context 256);
* in-process `transformers` `model.generate` at batch 1, 8, 32 on the same model and prompts (the
  practical limit: no HTTP, no scheduling, no per-request sampling);
* a BTM forest of 4 such experts at concurrency 16;
* fairness: concurrency 32 with prompts of 8 to 200 tokens; p50 and p99 of the short ones (<= 32 tokens).

The sequential gateway is the tree of `--baseline-ref` (default: the last commit before the engine),
checked out with `git archive` and served with this venv. The two gateways are measured in alternating
rounds (3 per level; medians) because this machine's speed drifts by tens of percent from minute to minute.

    .venv/bin/python bench/engine.py [--baseline-ref 0e5ddbe] [--quick] [--json bench/out/engine.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.gateways import ROOT, GatewayProc, build_gpt2, build_tokenizer, checkout, cleanup, pct, run_load

BASELINE_REF = "0e5ddbe"  # main before the engine (sequential generation on one thread)
NEW_TOKENS = 32
SIZE = {"layers": 4, "embd": 256, "heads": 4, "positions": 256}
FOREST_PRIOR = [0.4, 0.3, 0.2, 0.1]
# requests per round = WAVES x concurrency for the engine: the first wave's joint prefill and the last wave's
# tail (fewer than `concurrency` in flight) are a small part of a round (3-4 waves made them a third)
WAVES = 10


def prompts(tok: Any, count: int, lengths: tuple[int, int], seed: int) -> list[str]:
    """Prompts cut from Python's documentation, `lengths` tokens long (inclusive range)."""
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics.values())
    ids = tok(text[:400_000], add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(*lengths)
        start = rng.randrange(0, len(ids) - n)
        out.append(tok.decode(ids[start:start + n]))
    return out


def bodies(model: str, texts: list[str]) -> list[dict[str, Any]]:
    return [{"model": model, "prompt": t, "max_tokens": NEW_TOKENS, "temperature": 0} for t in texts]


def _batches(texts: list[str], batch: int, rounds: int) -> list[list[str]]:
    """rounds + 1 batches of `batch` texts (the first warms up), cycling through `texts`."""
    out = [texts[(i * batch) % len(texts):][:batch] for i in range(rounds + 1)]
    return [b if len(b) == batch else (b + texts)[:batch] for b in out]


def in_process(model_dir: Path, texts: list[str], batch: int, rounds: int) -> float:
    """tokens/s of `model.generate` (greedy, exactly NEW_TOKENS new tokens) on left-padded batches."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    tok.pad_token = tok.eos_token
    batches = _batches(texts, batch, rounds)
    tokens, seconds = 0, 0.0
    with torch.inference_mode():
        for i, b in enumerate(batches):
            enc = tok(b, return_tensors="pt", padding=True)
            t0 = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
            if i:  # the first batch warms up
                seconds += time.perf_counter() - t0
                tokens += (out.shape[1] - enc["input_ids"].shape[1]) * len(b)
    return tokens / seconds


def scheduler_in_process(model_dir: Path, texts: list[str], batch: int, rounds: int,
                         members: list[Path] | None = None) -> float:
    """tokens/s of the engine's own scheduler driven in this process (no HTTP, no load generator) on the
    same batches as `in_process`: what the engine costs next to `generate`, apart from the serving path.
    With `members`, the forest of those experts (prior 0.4/0.3/0.2/0.1, as served) instead of the model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from experts.base import GenerationParams
    from experts.btm.mixture.model import EnsembleLM
    from experts.hf.engine.batch import Limits
    from experts.hf.engine.choices import Request
    from experts.hf.engine.scheduler import ModelScheduler

    if members:
        model = EnsembleLM([AutoModelForCausalLM.from_pretrained(m).eval() for m in members], FOREST_PRIOR).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    batches = _batches(texts, batch, rounds)
    tokens, seconds = 0, 0.0
    with torch.inference_mode():
        for i, b in enumerate(batches):
            sched = ModelScheduler(model, tok, Limits())
            for text in b:
                ids = tok(text, add_special_tokens=False)["input_ids"]
                r = Request(GenerationParams(max_tokens=NEW_TOKENS, temperature=0.0), tok, lambda events: None)
                r.add_prompt(text, ids, len(ids))
                sched.add(r)
            t0 = time.perf_counter()
            steps = 0
            while sched.has_work() and steps < 10_000:
                sched.step()
                steps += 1
            if i:  # the first batch warms up
                seconds += time.perf_counter() - t0
                tokens += NEW_TOKENS * len(b)
    return tokens / seconds


def client_cpu_share(gw: GatewayProc, model: str, texts: list[str], concurrency: int, total: int) -> float:
    """The load generator's own CPU time over the run's wall time (its share of this machine's cores)."""
    t_cpu = time.process_time()
    res = run_load(gw.base, bodies(model, (texts * (total // len(texts) + 1))[:total]), concurrency)
    return (time.process_time() - t_cpu) / res.seconds


def measure(gw: GatewayProc, model: str, texts: list[str], concurrency: int, total: int) -> dict[str, float]:
    """One gateway at one concurrency (used by quick checks; the report uses `interleaved`)."""
    run_load(gw.base, bodies(model, texts[:max(2, concurrency)]), concurrency)  # warm up
    res = run_load(gw.base, bodies(model, (texts * (total // len(texts) + 1))[:total]), concurrency)
    return {"rps": res.rps, "tps": res.tps, "p50_ms": pct(res.latencies, 50) * 1e3,
            "p99_ms": pct(res.latencies, 99) * 1e3, "requests": len(res.latencies)}


def fairness(gw: GatewayProc, tok: Any, total: int) -> dict[str, float]:
    texts = prompts(tok, total, (8, 200), seed=7)
    res = run_load(gw.base, bodies("bench", texts), 32)
    short = [dt for n, dt in res.by_prompt_len if n <= 32]
    return {"short_requests": len(short), "short_p50_ms": pct(short, 50) * 1e3, "short_p99_ms": pct(short, 99) * 1e3,
            "p99_over_p50": pct(short, 99) / pct(short, 50), "all_p99_ms": pct(res.latencies, 99) * 1e3}


def setup(gw: GatewayProc, model_dir: Path, members: list[Path]) -> None:
    gw.register("bench", model_dir)
    for i, m in enumerate(members):
        gw.register(f"member{i}", m)
    gw.post("/admin/btm/forests", {"id": "forest", "members": [f"member{i}" for i in range(len(members))],
                                   "prior": {"weights": FOREST_PRIOR}})
    gw.post("/admin/experts/forest/pin", {"pinned": True})


def interleaved(gws: dict[str, GatewayProc], model: str, texts: list[str], concurrency: int, total: int,
                rounds: int) -> dict[str, dict[str, float]]:
    """Both gateways measured in alternating rounds (this machine's speed drifts by tens of percent over
    minutes); each figure is the median over rounds, latencies pooled."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in gws}
    for gw in gws.values():
        run_load(gw.base, bodies(model, texts[:max(2, concurrency)]), concurrency)  # warm up
    for _ in range(rounds):
        for name, gw in gws.items():
            n = total if name == "engine" else min(total, max(16, concurrency))  # sequential: ~10 req/s
            res = run_load(gw.base, bodies(model, (texts * (n // len(texts) + 1))[:n]), concurrency)
            runs[name].append({"rps": res.rps, "tps": res.tps, "lat": res.latencies})
    out = {}
    for name, rs in runs.items():
        lat = [x for r in rs for x in r["lat"]]
        out[name] = {"rps": statistics.median(r["rps"] for r in rs), "tps": statistics.median(r["tps"] for r in rs),
                     "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3, "requests": len(lat)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline-ref", default=BASELINE_REF)
    ap.add_argument("--quick", action="store_true", help="fewer requests and levels (smoke test)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    levels = (1, 32) if args.quick else (1, 4, 16, 32, 64)
    rounds = 1 if args.quick else 3
    tmp = Path(tempfile.mkdtemp(prefix="mg-engine-bench-"))
    results: dict[str, Any] = {"model": SIZE, "new_tokens": NEW_TOKENS, "baseline_ref": args.baseline_ref,
                               "engine": {}, "sequential": {}}
    gws: dict[str, GatewayProc] = {}
    try:
        tok = build_tokenizer(4096)
        model_dir = build_gpt2(tmp / "model", tok, seed=0, **SIZE)
        members = [build_gpt2(tmp / f"member{i}", tok, seed=1 + i, **SIZE) for i in range(4)]
        texts = prompts(tok, 64, (16, 24), seed=1)
        gws = {"engine": GatewayProc(ROOT, tmp / "data-new").start(),
               "sequential": GatewayProc(checkout(args.baseline_ref, tmp / "baseline"), tmp / "data-old").start()}
        for gw in gws.values():
            setup(gw, model_dir, members)
        ip: list[dict[int, float]] = []
        for c in levels:
            if c == 32 or c == levels[0]:  # in-process generate next to the levels it is compared with
                ip.append({b: in_process(model_dir, texts, b, 2 if args.quick else 4) for b in (1, 8, 32)})
                ip[-1]["scheduler_32"] = scheduler_in_process(model_dir, texts, 32, 2 if args.quick else 4)
            total = max(16, 2 * c) if args.quick else max(64, WAVES * c)
            for name, fig in interleaved(gws, "bench", texts, c, total, rounds).items():
                results[name][c] = fig
        results["in_process_tps"] = {b: statistics.mean(x[b] for x in ip) for b in (1, 8, 32, "scheduler_32")}
        results["client_cpu_share_c32"] = client_cpu_share(gws["engine"], "bench", texts, 32, 128)
        for name, fig in interleaved(gws, "forest", texts, 16, 16 if args.quick else WAVES * 16, rounds).items():
            results[name]["forest_c16"] = fig
        results["forest_in_process_tps_16"] = scheduler_in_process(model_dir, texts, 16, 2 if args.quick else 4,
                                                                   members)
        results["fairness"] = fairness(gws["engine"], tok, 64 if args.quick else 160)
    finally:
        for gw in gws.values():
            gw.stop()
        cleanup(tmp)
    report(results, levels)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


def report(r: dict[str, Any], levels: tuple[int, ...]) -> None:
    e, s, ip = r["engine"], r["sequential"], r["in_process_tps"]
    print(f"GPT-2 {SIZE['layers']}x{SIZE['embd']}, vocab 4096, {NEW_TOKENS}-token greedy completions; "
          f"sequential gateway = {r['baseline_ref']}\n")
    print(f"in-process model.generate: batch 1 {ip[1]:.0f} tok/s, batch 8 {ip[8]:.0f}, batch 32 {ip[32]:.0f}; "
          f"the engine's scheduler in process at batch 32: {ip['scheduler_32']:.0f} tok/s "
          f"({ip['scheduler_32'] / ip[32]:.2f}x generate)")
    print(f"the load generator (this process) uses {r['client_cpu_share_c32']:.2f} CPU cores at concurrency 32 "
          "on this machine, cores the gateway then lacks\n")
    print(f"{'conc':>5} | {'engine req/s':>12} {'tok/s':>7} {'p50 ms':>7} {'p99 ms':>7} | {'sequential req/s':>16} "
          f"{'tok/s':>7} {'p50 ms':>7} | {'x seq':>6} {'/ in-proc b32':>13}")
    for c in levels:
        a, b = e[c], s[c]
        print(f"{c:5d} | {a['rps']:12.1f} {a['tps']:7.0f} {a['p50_ms']:7.0f} {a['p99_ms']:7.0f} | {b['rps']:16.1f} "
              f"{b['tps']:7.0f} {b['p50_ms']:7.0f} | {a['rps'] / b['rps']:6.2f} {a['tps'] / ip[32]:13.2f}")
    print()
    c32 = e[levels[-1] if 32 not in e else 32]
    print(f"throughput at concurrency 32: {c32['rps'] / s[32]['rps']:.2f}x the sequential gateway (target >= 8), "
          f"{c32['tps'] / ip[32]:.2f} of in-process generate at batch 32 (target >= 0.70)")
    print(f"latency at concurrency 1: p50 {e[1]['p50_ms']:.0f} ms vs {s[1]['p50_ms']:.0f} ms "
          f"({e[1]['p50_ms'] / s[1]['p50_ms']:.2f}x; target <= 1.10)")
    fe, fs, fip = e["forest_c16"], s["forest_c16"], r["forest_in_process_tps_16"]
    print(f"forest at concurrency 16: {fe['rps']:.1f} vs {fs['rps']:.1f} req/s ({fe['rps'] / fs['rps']:.2f}x; "
          f"target >= 4); the forest's scheduler in process at batch 16: {fip:.0f} tok/s, "
          f"{fip / fs['tps']:.2f}x the sequential gateway (the ceiling of that ratio); the engine reaches "
          f"{fe['tps'] / fip:.2f} of it")
    f = r["fairness"]
    print(f"fairness at concurrency 32, prompts 8-200 tokens: short requests ({f['short_requests']}) p50 "
          f"{f['short_p50_ms']:.0f} ms, p99 {f['short_p99_ms']:.0f} ms ({f['p99_over_p50']:.2f}x; target <= 3)")


if __name__ == "__main__":
    main()
