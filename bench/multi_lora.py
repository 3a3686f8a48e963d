"""Many LoRA adapters on one resident base (issue 13): memory, throughput, and batched session evaluation.

Measured in one run on this machine, on a demo-sized base (GPT-2, 4 layers x 256, vocab 4096, context 256,
random weights: speed does not depend on the values) and 20 rank-8 LoRA adapters on it (lora_alpha 16, on
c_attn, c_proj and c_fc: every linear layer; random factors), everything built locally:

* (a) memory: a gateway serving the 20 adapters on the resident base (each asked once, then all at once):
  its RSS growth over the base alone, and the bytes it accounts (`/metrics`: mergegate_loaded_bytes,
  mergegate_adapter_cache_bytes), against base + 1.5x the adapters' bytes (the target) and against today's
  alternative, one merged full copy per adapter (a second gateway serving the 20 merged copies: its RSS
  growth from one copy to 20 plus the first copy's weights, and its accounted bytes);
* (b) throughput through the real gateway: 32 concurrent 32-token greedy completions spread over the 20
  adapters (round-robin) against 32 to the bare base (target >= 70%), measured in alternating rounds
  (medians; this machine's speed drifts by tens of percent from minute to minute), and for reference the
  same 32 requests to the 20 merged copies on the second gateway;
* (c) a merge session's evaluation of one popsize-20 generation (random alpha in [0.5, 1], beta in
  [-0.3, 0.3]) over 32 validation texts x 128 tokens: ``evaluate_many`` batched (rows = candidates x
  examples, what ``evaluate_batch`` runs now) against ``evaluate_many(batched=False)`` (the per-candidate
  path every evaluation took before), same session, same candidates, alternating rounds (target >= 5x,
  losses equal within 1e-4).

    nice -n 10 .venv/bin/python bench/multi_lora.py [--quick] [--rounds 3] [--json bench/out/multi_lora.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx

from bench.engine import prompts
from bench.gateways import ROOT, GatewayProc, build_gpt2, build_tokenizer, cleanup, randomize_lora, run_load
from experts.hf.engine.heap import AFTER_IDLE_S

SIZE = {"layers": 4, "embd": 256, "heads": 4, "positions": 256}
TARGETS = ("c_attn", "c_proj", "c_fc")
RANK = 8
NEW_TOKENS = 32
MEMORY_TARGET = 1.5  # resident <= base + 1.5 x the adapters' bytes
THROUGHPUT_TARGET = 0.70  # 32 requests over 20 adapters >= 70% of 32 to the bare base
SESSION_TARGET = 5.0  # batched evaluate of a generation >= 5x per-candidate
LOSS_TOLERANCE = 1e-4


# ------------------------------------------------------------------------------------------------
# the figures (pure: tests/bench/test_multi_lora.py)


def spread(models: list[str], texts: list[str], count: int) -> list[dict[str, Any]]:
    """`count` greedy completion bodies, request i to models[i % len(models)] with texts[i % len(texts)]."""
    return [{"model": models[i % len(models)], "prompt": texts[i % len(texts)], "max_tokens": NEW_TOKENS,
             "temperature": 0} for i in range(count)]


def memory_figures(base_bytes: int, adapter_bytes: int, rss_growth: int, merged_rss_growth: int, n_adapters: int,
                   accounted: int = 0) -> dict[str, Any]:
    """(a): resident = base + the RSS growth for serving the adapters, against the target's bound (base +
    1.5x the adapters' bytes) and today's alternative (one merged copy per adapter: the first copy's
    weights + the RSS growth for the other copies); `accounted`: the bytes the gateway itself accounts
    (resident models + adapter cache), against the same bound."""
    resident = base_bytes + rss_growth
    bound = base_bytes + MEMORY_TARGET * adapter_bytes
    merged = base_bytes + merged_rss_growth
    return {"base_bytes": base_bytes, "adapters_bytes": adapter_bytes, "n_adapters": n_adapters,
            "rss_growth_bytes": rss_growth, "resident_bytes": resident, "target_bytes": round(bound),
            "resident_over_target": round(resident / bound, 3),
            "growth_over_adapters": round(rss_growth / adapter_bytes, 3) if adapter_bytes else None,
            "accounted_bytes": accounted, "accounted_over_target": round(accounted / bound, 3),
            "merged_resident_bytes": merged, "merged_over_resident": round(merged / resident, 2),
            "merged_accounted_bytes": n_adapters * base_bytes, "met": resident <= bound,
            "accounted_met": 0 < accounted <= bound}


def ratio_figures(times: dict[str, list[float]]) -> dict[str, float]:
    """Medians of alternating rounds and their ratio: {'batched', 'per_candidate', 'speedup'} (seconds)."""
    b, p = statistics.median(times["batched"]), statistics.median(times["per_candidate"])
    return {"batched_s": round(b, 4), "per_candidate_s": round(p, 4), "speedup": round(p / b, 2)}


def metric(text: str, name: str) -> float:
    """A gauge's value from a Prometheus text page (0 when absent)."""
    m = re.search(rf"^{re.escape(name)} ([0-9.eE+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# ------------------------------------------------------------------------------------------------
# set-up


def build_pool(root: Path, tok: Any, n: int) -> tuple[Path, list[Path], list[Path], int, int]:
    """(base dir, adapter dirs, merged-copy dirs, base tensor bytes, adapters' tensor bytes)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base_dir = build_gpt2(root / "base", tok, seed=0, **SIZE)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    unique = {t.data_ptr(): t for t in model.state_dict().values()}  # the tied head counted once
    base_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(TARGETS),
                                                  lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    adapters, merged, adapter_bytes = [], [], 0
    for i in range(n):
        randomize_lora(peft_model, g, 0.05)
        d = root / f"adapter{i:02d}"
        peft_model.save_pretrained(d)
        adapter_bytes += sum(t.numel() * t.element_size()
                             for t in load_file(str(d / "adapter_model.safetensors")).values())
        adapters.append(d)
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), d).merge_and_unload()
        out = root / f"merged{i:02d}"
        m.save_pretrained(out)
        tok.save_pretrained(out)
        merged.append(out)
    return base_dir, adapters, merged, base_bytes, adapter_bytes


def rss(gw: GatewayProc) -> int:
    """The gateway process's resident set size, in bytes (Linux)."""
    assert gw.proc is not None
    for line in Path(f"/proc/{gw.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def metrics_page(gw: GatewayProc) -> str:
    return httpx.get(gw.base + "/metrics", headers=gw.admin, timeout=30).text


def settle(gw: GatewayProc, bodies: list[dict[str, Any]], concurrency: int) -> int:
    """Serve `bodies` (every model loaded and its buffers grown), then the RSS at rest: after the engine has been
    idle long enough to hand its freed buffers back (experts.hf.engine.heap)."""
    run_load(gw.base, bodies, concurrency)
    time.sleep(AFTER_IDLE_S + 0.5)
    return rss(gw)


# ------------------------------------------------------------------------------------------------
# (c) merge session, in process


def session_bench(base_dir: Path, adapters: list[Path], root: Path, *, examples: int, tokens: int, popsize: int,
                  rounds: int) -> dict[str, Any]:
    import pydoc_data.topics

    import torch

    from experts.evo.batched import BatchedRun
    from experts.evo.sessions import LossOptions, MergeSessionManager, ValidationSpec
    from experts.runtime import open_repository

    repo = open_repository(root / "data", database_url=f"sqlite:///{root / 'registry.db'}", max_loaded_models=2,
                           max_loaded_bytes=1 << 30)
    try:
        repo.register_from_dir("base", base_dir)
        for i, d in enumerate(adapters):
            repo.register_from_dir(f"ad{i:02d}", d, base="base", tags=["pool"])
        texts = [v for _, v in sorted(pydoc_data.topics.topics.items()) if len(v) > 8 * tokens][:examples]
        spec = ValidationSpec(examples=tuple({"text": t[: 12 * tokens]} for t in texts))
        s = MergeSessionManager(repo).create("base", {"tags": ["pool"]}, spec,
                                             loss=LossOptions(max_tokens_per_example=tokens), budget=10**7,
                                             mode="dense")
        n = len(adapters)
        g = torch.Generator().manual_seed(0)
        gen = [((0.5 + 0.5 * torch.rand(n, generator=g)).tolist(), (0.6 * torch.rand(n, generator=g) - 0.3).tolist())
               for _ in range(popsize)]
        s.evaluate_many(gen[:2])  # warm-up
        s.evaluate(*gen[0])
        times: dict[str, list[float]] = {"batched": [], "per_candidate": []}
        losses: dict[str, list[float]] = {}
        for _ in range(rounds):
            for name, batched in (("per_candidate", False), ("batched", True)):
                t = time.perf_counter()
                losses[name] = s.evaluate_many(gen, batched=batched)
                times[name].append(time.perf_counter() - t)
        diff = max(abs(a - b) for a, b in zip(losses["batched"], losses["per_candidate"], strict=True))
        figures = ratio_figures(times)
        run = BatchedRun(s, s.check_candidates(gen))
        per_round = {k: [round(x, 3) for x in v] for k, v in times.items()}
        return {**figures, "per_round_s": per_round, "rounds": rounds, "popsize": popsize, "examples": s.n_examples,
                "scored_tokens": s.n_tokens, "forward_tokens": s.forward_tokens,
                "groups": [len(x) for x in run.groups], "forwards_batched": len(run),
                "forwards_per_candidate": popsize * len(s.batches), "max_abs_loss_diff": diff,
                "losses_equal": diff <= LOSS_TOLERANCE, "threads": torch.get_num_threads(),
                "met": figures["speedup"] >= SESSION_TARGET}
    finally:
        repo.close()


# ------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=int, default=20)
    ap.add_argument("--requests", type=int, default=32, help="concurrent requests per throughput round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per comparison")
    ap.add_argument("--examples", type=int, default=32, help="validation texts of the session")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per validation text")
    ap.add_argument("--quick", action="store_true", help="1 round, 8 validation texts (smoke run)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.examples = 1, 8
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    tmp = Path(tempfile.mkdtemp(prefix="mg-multilora-bench-"))
    gws: dict[str, GatewayProc] = {}
    result: dict[str, Any] = {"model": SIZE, "rank": RANK, "targets": list(TARGETS), "new_tokens": NEW_TOKENS,
                              "load_average": round(os.getloadavg()[0], 2)}
    try:
        t0 = time.perf_counter()
        tok = build_tokenizer(4096)
        base_dir, adapters, merged, base_bytes, adapter_bytes = build_pool(tmp / "src", tok, args.adapters)
        texts = prompts(tok, 64, (16, 24), seed=1)
        ids = [f"ad{i:02d}" for i in range(len(adapters))]
        env = {"MERGEGATE_MAX_LOADED_MODELS": str(len(merged) + 4)}
        gws = {"multi": GatewayProc(ROOT, tmp / "data-multi", env=env).start(),
               "merged": GatewayProc(ROOT, tmp / "data-merged", env=env).start()}
        multi, copies = gws["multi"], gws["merged"]
        multi.register("base", base_dir)
        for eid, d in zip(ids, adapters, strict=True):
            multi.post("/admin/experts", {"id": eid, "path": str(d), "base": "base"})
        merged_ids = [f"m{i:02d}" for i in range(len(merged))]
        for eid, d in zip(merged_ids, merged, strict=True):
            copies.register(eid, d)
        result["setup_s"] = round(time.perf_counter() - t0, 1)

        # (a) memory: RSS after each phase's last round (a phase is `rounds` rounds of the same load)
        phases = max(2, args.rounds)
        for _ in range(phases):
            rss_base = settle(multi, spread(["base"], texts, args.requests), args.requests)
        settle(multi, spread(ids, texts, len(ids)), 1)  # each adapter alone first
        for _ in range(phases):
            rss_adapters = settle(multi, spread(ids, texts, args.requests), args.requests)
        page = metrics_page(multi)
        for _ in range(phases):
            rss_one = settle(copies, spread(merged_ids[:1], texts, args.requests), args.requests)
        settle(copies, spread(merged_ids, texts, len(merged_ids)), 1)
        for _ in range(phases):
            rss_all = settle(copies, spread(merged_ids, texts, args.requests), args.requests)
        merged_page = metrics_page(copies)
        acc_base, acc_adapters = int(metric(page, "mergegate_loaded_bytes")), \
            int(metric(page, "mergegate_adapter_cache_bytes"))
        mem = memory_figures(base_bytes, adapter_bytes, rss_adapters - rss_base, rss_all - rss_one, len(adapters),
                             acc_base + acc_adapters)
        mem.update({"accounted_base_bytes": acc_base, "accounted_adapter_bytes": acc_adapters,
                    "adapter_cache_entries": int(metric(page, "mergegate_adapter_cache_adapters")),
                    "merged_accounted_loaded_bytes": int(metric(merged_page, "mergegate_loaded_bytes")),
                    "rss_multi_bytes": rss_adapters, "rss_merged_bytes": rss_all})
        result["memory"] = mem

        # (b) throughput, alternating rounds
        sides = {"base": (multi, ["base"]), "adapters": (multi, ids), "merged_copies": (copies, merged_ids)}
        runs: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(args.rounds):
            for name, (gw, models) in sides.items():
                runs[name].append(run_load(gw.base, spread(models, texts, args.requests), args.requests).tps)
        tps = {k: round(statistics.median(v), 1) for k, v in runs.items()}
        result["throughput"] = {"requests": args.requests, "rounds": args.rounds, "tokens_per_s": tps,
                                "per_round_tokens_per_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
                                "adapters_over_base": round(tps["adapters"] / tps["base"], 3),
                                "merged_over_base": round(tps["merged_copies"] / tps["base"], 3),
                                "met": tps["adapters"] / tps["base"] >= THROUGHPUT_TARGET}
        for gw in gws.values():
            gw.stop()
        gws = {}

        # (c) the session
        result["session"] = session_bench(base_dir, adapters, tmp / "session", examples=args.examples,
                                          tokens=args.tokens, popsize=20, rounds=args.rounds)
        result["seconds"] = round(time.perf_counter() - t0, 1)
    finally:
        for gw in gws.values():
            gw.stop()
        cleanup(tmp)
    report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


def _mb(x: float) -> str:
    return f"{x / 2**20:.1f} MiB"


def report(r: dict[str, Any]) -> None:
    m, t, s = r["memory"], r["throughput"], r["session"]
    ok = {True: "met", False: "NOT met"}
    print(f"GPT-2 {SIZE['layers']}x{SIZE['embd']}, vocab 4096; {m['n_adapters']} rank-{RANK} LoRA adapters on "
          f"{', '.join(TARGETS)}; load average {r['load_average']}; {r['seconds']} s in all\n")
    print("(a) memory           | bytes")
    print(f"  base weights       | {_mb(m['base_bytes'])} (accounted by the gateway: {_mb(m['accounted_base_bytes'])})")
    print(f"  adapters' tensors  | {_mb(m['adapters_bytes'])} (adapter cache: {_mb(m['accounted_adapter_bytes'])}, "
          f"{m['adapter_cache_entries']} entries)")
    print(f"  RSS growth, 20 adapters served | {_mb(m['rss_growth_bytes'])} ({m['growth_over_adapters']}x the "
          "adapters' bytes)")
    print(f"  resident = base + growth | {_mb(m['resident_bytes'])} vs target base + 1.5x adapters "
          f"{_mb(m['target_bytes'])}: {m['resident_over_target']:.2f}x the bound, {ok[m['met']]}")
    print(f"  accounted (models + adapter cache) | {_mb(m['accounted_bytes'])}: {m['accounted_over_target']:.2f}x "
          f"the bound, {ok[m['accounted_met']]}")
    print(f"  today: 20 merged copies | {_mb(m['merged_resident_bytes'])} resident (accounted "
          f"{_mb(m['merged_accounted_loaded_bytes'])}): {m['merged_over_resident']:.1f}x the multi-LoRA figure\n")
    tp = t["tokens_per_s"]
    print(f"(b) throughput, {t['requests']} concurrent {NEW_TOKENS}-token requests, medians of {t['rounds']} "
          "alternating rounds")
    print(f"  bare base {tp['base']:.0f} tok/s | over 20 adapters {tp['adapters']:.0f} tok/s "
          f"({t['adapters_over_base']:.2f}x; target >= {THROUGHPUT_TARGET}: {ok[t['met']]}) | "
          f"20 merged copies {tp['merged_copies']:.0f} tok/s ({t['merged_over_base']:.2f}x)\n")
    print(f"(c) session, popsize {s['popsize']}, {s['examples']} examples ({s['scored_tokens']} scored tokens), "
          f"{s['threads']} threads, medians of {s['rounds']} alternating rounds")
    print(f"  per-candidate {s['per_candidate_s']:.2f} s ({s['forwards_per_candidate']} forwards) | batched "
          f"{s['batched_s']:.2f} s ({s['forwards_batched']} forwards, groups {s['groups']}) | "
          f"{s['speedup']:.2f}x (target >= {SESSION_TARGET:.0f}: {ok[s['met']]}); "
          f"max |loss diff| {s['max_abs_loss_diff']:.1e} ({ok[s['losses_equal']]})")


if __name__ == "__main__":
    main()
