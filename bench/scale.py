"""Scale-out on Ray (issue 15): a BTM first round and one search generation, local runner vs Ray with 1 and
2 workers, on this machine.

    python bench/scale.py                       # 2 domains, popsize 20 (the numbers in docs/benchmarks.md)
    python bench/scale.py --domains code,python_docs,licenses,dictionary --json bench/out/scale.json

Setup (built locally, nothing downloaded): a local Ray cluster with the machine's CPUs (`ray.init`, no
dashboard). BTM: the pipeline's seed (paper protocol, a 2-layer x 128 GPT-2, BPE vocab 2048) trained once,
then the first round (one expert per domain, each resuming the seed; `--seed-fraction` 0.1 so that the
round dominates) timed three ways: the local runner (one after another in this process, torch on all
cores), Ray with 1 worker (one task at a time) and Ray with 2 workers (tasks in parallel, one CPU and one
torch thread each), on workers warmed first (their start-up, importing torch and transformers, is timed
apart); registration included, the seed and the tokenizer not.
Search: the merge-session pool of bench/merge_sessions.py (a demo-size GPT-2, N rank-8 adapters, 32
validation texts of 128 tokens); one generation of 20 candidates evaluated by a local session and by 1
and 2 Ray actors (the actors' start-up, model and pool load, timed apart). Also measured: a Ray task's
round trip on a warm worker and on a fresh one (the cost of starting a task).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from bench.merge_sessions import build
from experts.btm.operations import BTM, ModelSize
from experts.btm.pipeline import seed_lineage, train_first_round
from experts.btm.protocol import plan_budget
from experts.evo.ray_provider import RayProvider
from experts.evo.search_job import LocalProvider
from experts.evo.sessions import MergeSessionManager
from experts.runtime import open_repository
from experts.training.config import TrainConfig
from experts.training.ray_runner import RayRunner


def _noop(x: int) -> int:
    return x


def _warm(x: int) -> int:
    """Import what a training task imports (torch, transformers, the BTM code), then hold the worker a moment
    so that concurrent calls land on distinct workers."""
    import transformers  # noqa: F401

    import experts.btm.operations  # noqa: F401

    time.sleep(1.0)
    return os.getpid()


def task_start(runner: RayRunner) -> dict[str, float]:
    """Round trip of a trivial task: on a fresh worker (first call), then warm (median of 20)."""
    t = time.perf_counter()
    runner.map(_noop, [0])
    cold = time.perf_counter() - t
    warm = []
    for i in range(20):
        t = time.perf_counter()
        runner.map(_noop, [i])
        warm.append(time.perf_counter() - t)
    return {"first_task_s": cold, "warm_task_ms": 1000 * sorted(warm)[10]}


def btm_round(root: Path, domains: list[str], size: ModelSize, budget: TrainConfig, seed_fraction: float) -> dict:
    repo = open_repository(root / "data", max_loaded_models=4, max_loaded_bytes=1 << 30)
    btm = BTM(repo, root / "data", corpus_bytes=600_000)
    plan = plan_budget(budget, len(domains), seed_fraction=seed_fraction, batch_split="paper")
    t = time.perf_counter()
    btm.seed("s-seed", domains, plan.seed, size)
    out: dict = {"domains": domains, "seed_s": time.perf_counter() - t, "expert_steps": plan.expert.max_tokens
                 // (plan.expert.batch_size * plan.expert.seq_len)}

    def tag(name: str) -> dict:
        return {"pipeline": {"key": "bench", "prefix": "s", "stage": name}}

    def clear() -> None:
        for d in domains:
            if repo.registry.has_expert(f"s-{d}"):
                repo.delete(f"s-{d}")

    def tasks() -> list:
        return [btm.train_task(f"s-{d}", "s-seed", d, plan.expert, seed_offset=i + 1, resume=True,
                               lineage=seed_lineage("s-seed", d, "seed", tag)) for i, d in enumerate(domains)]

    t = time.perf_counter()
    for i, d in enumerate(domains):
        btm.train(f"s-{d}", "s-seed", d, plan.expert, seed_offset=i + 1, resume=True,
                  lineage=seed_lineage("s-seed", d, "seed", tag))
    out["local_s"] = time.perf_counter() - t
    t = time.perf_counter()
    pids = RayRunner(workers=2).map(_warm, [0, 1])
    out["worker_warmup_s"], out["warm_workers"] = time.perf_counter() - t, len(set(pids))
    for workers in (1, 2):
        clear()
        runner = RayRunner(workers=workers)
        t = time.perf_counter()
        train_first_round(btm, runner, tasks(), lambda f, m: None, None)
        out[f"ray{workers}_s"] = time.perf_counter() - t
    repo.close()
    return out


def search_generation(root: Path, n: int, popsize: int) -> dict:
    repo, texts = build(root, n, 4, 256, 4096, 8)
    examples = [{"text": t[:2000]} for t in texts[:32]]
    body = {"base": "base", "pool": [f"ad{i:02d}" for i in range(n)], "validation": {"examples": examples},
            "loss": {"max_tokens_per_example": 128}, "budget": 10 * popsize}
    manager = MergeSessionManager(repo, max_sessions=4)
    rng = random.Random(0)
    pairs = [([rng.uniform(0.5, 1) for _ in range(n)], [rng.uniform(-0.3, 0.3) for _ in range(n)])
             for _ in range(popsize)]
    out: dict = {"n": n, "popsize": popsize}
    local = LocalProvider(manager)
    t = time.perf_counter()
    ev, view = local.open(body)
    out["local_open_s"] = time.perf_counter() - t
    t = time.perf_counter()
    expected = [ev.evaluate(a, b) for a, b in pairs]
    out["local_s"] = time.perf_counter() - t
    local.close(view["id"])
    for workers in (1, 2):
        provider = RayProvider(manager, RayRunner(), workers=workers)
        t = time.perf_counter()
        ev, view = provider.open(body)
        out[f"ray{workers}_open_s"] = time.perf_counter() - t
        ev.evaluate_many(pairs[:workers])  # warm-up: first forward per actor
        ev.budget += popsize
        t = time.perf_counter()
        losses = ev.evaluate_many(pairs)
        out[f"ray{workers}_s"] = time.perf_counter() - t
        out[f"ray{workers}_max_abs_diff"] = max(abs(x - y) for x, y in zip(losses, expected, strict=True))
        provider.close(view["id"])
    out["per_candidate_local_ms"] = 1000 * out["local_s"] / popsize
    repo.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default="code,python_docs")
    ap.add_argument("--tokens", type=int, default=8 * 128 * 400, help="the dense run's token budget")
    ap.add_argument("--seed-fraction", type=float, default=0.1,
                    help="the seed's share of the updates (small here: the round is what is timed)")
    ap.add_argument("--pool", type=int, default=8, help="adapters in the search's pool")
    ap.add_argument("--popsize", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import ray

    cpus = os.cpu_count() or 1
    RayRunner(num_cpus=cpus).start()
    out: dict = {"cpus": cpus, "torch_threads_local": torch.get_num_threads()}
    out["task_start"] = task_start(RayRunner(workers=1))
    size = ModelSize(n_layer=2, n_embd=128, n_head=2, n_positions=128, vocab_size=2048)
    budget = TrainConfig(max_tokens=args.tokens, batch_size=8, seq_len=128, lr=1e-3)
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        out["btm"] = btm_round(Path(tmp) / "btm", args.domains.split(","), size, budget,
                               args.seed_fraction)
        out["search"] = search_generation(Path(tmp) / "search", args.pool, args.popsize)
    ray.shutdown()
    b, s = out["btm"], out["search"]
    print(f"machine: {cpus} CPUs; Ray task round trip {out['task_start']['warm_task_ms']:.1f} ms warm, "
          f"{out['task_start']['first_task_s']:.1f} s on a fresh worker")
    print(f"{'':34}{'local':>10}{'ray x1':>10}{'ray x2':>10}{'x1/x2':>8}{'local/x2':>10}")
    row_b, row_s = f"BTM first round, {len(b['domains'])} experts (s)", f"search generation, pop {s['popsize']} (s)"
    print(f"{row_b:34}{b['local_s']:10.1f}{b['ray1_s']:10.1f}"
          f"{b['ray2_s']:10.1f}{b['ray1_s'] / b['ray2_s']:8.2f}{b['local_s'] / b['ray2_s']:10.2f}")
    print(f"{row_s:34}{s['local_s']:10.2f}{s['ray1_s']:10.2f}"
          f"{s['ray2_s']:10.2f}{s['ray1_s'] / s['ray2_s']:8.2f}{s['local_s'] / s['ray2_s']:10.2f}")
    print(f"{'search session open (s)':34}{s['local_open_s']:10.2f}{s['ray1_open_s']:10.2f}{s['ray2_open_s']:10.2f}")
    print(f"Ray workers warmed (2 at once, importing torch and transformers) in {b['worker_warmup_s']:.1f} s, "
          f"before the timed rounds")
    print(f"seed {b['seed_s']:.1f} s; {b['expert_steps']} updates per expert; per-candidate eval (local) "
          f"{s['per_candidate_local_ms']:.0f} ms; max |loss diff| vs local "
          f"{max(s['ray1_max_abs_diff'], s['ray2_max_abs_diff']):.1e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
