"""Evo-Merging's comparison (Chen et al. 2025, arXiv:2509.12951) reproduced on the demo LoRA pool.

    python bench/evo_repro.py --data-dir bench/out/evo_data --threads 2 --out bench/out/evo_repro.json
    python bench/evo_repro.py --quick --data-dir /tmp/evo-quick --out /tmp/evo-quick.json   # CI, ~1-2 min

Builds (or completes: resumable) the demo pool with `experts.evo.pool.build_pool` in the data dir, then for
each held-out target task (no pool adapter trained on it) opens a merge session on its validation split
(the search's only signal) and a second one on its test split (the report), and runs every method at the
same per-method query budget on the validation session:

* Evo-Merging: two stages (budget split 1:3 / 2:3 as the paper's 400:800), CMA-ES popsize 20, sigma0 0.05;
* LoraHub: NGOpt over beta in [-1.5, 1.5]^N from 0, alpha = 1, same budget;
* ablations: no denoising (alpha = 1, beta searched), no scaling (beta = 1/N, alpha searched),
  no negative beta (beta in [0, 1.5]);
* uniform average (alpha = 1, beta = 1/N: the operator's "w/o denoising & scaling");
* task arithmetic in the operator (alpha = 1, beta = lambda for all; lambda from a grid);
* white-box task arithmetic, TIES and DARE-TIES on the adapters' deltas dW_i = s B_i A_i (merge library,
  base = 0, so the method sees the task vectors themselves), lambda x density x top-K pre-selection from
  a grid (top-K ranks adapters by their single-adapter validation loss, those N queries are counted);
* the best single adapter on validation (N queries).

Test scores come from a white-box copy of the base (W = W0 + dW written in place) on the test session's
batches: loss (mean token CE over completion tokens, the session's definition), token accuracy (argmax =
target at every scored position, teacher-forced) and exact match (every completion token is the argmax,
i.e. greedy decoding from the prompt reproduces the completion's tokens). For every (alpha, beta) result
the test session's own loss is also recorded and must agree (`session_gap`). Test evaluations are never
counted in a method's budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that spin while waiting stall badly when another process holds a core (see build_pool.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import warnings

import torch

from bench.evo_whitebox import Metered, WhiteBox

SEARCHED = ("evo_merging", "lorahub", "no_denoise", "no_scale", "no_negative", "lorahub_40")
FIXED = ("uniform", "task_arithmetic_beta", "best_single")  # (alpha, beta) candidates picked on validation
WHITE_BOX = ("task_arithmetic_dw", "ties", "dare_ties")  # merge-library methods on the deltas dW_i
METHODS = (*SEARCHED, *FIXED[:2], *WHITE_BOX, FIXED[2], "base")
NATIVE_LORAHUB_BUDGET = 40  # LoraHub's own max_inference_step, an extra row below the equal-budget ones
LABELS = {"base": "base (no adapter)", "evo_merging": "Evo-Merging", "lorahub": "LoraHub (NGOpt)",
          "lorahub_40": f"LoraHub at its own budget ({NATIVE_LORAHUB_BUDGET})",
          "no_denoise": "w/o denoising", "no_scale": "w/o scaling", "no_negative": "w/o negative beta",
          "uniform": "uniform average", "task_arithmetic_beta": "task arithmetic (beta = lambda)",
          "task_arithmetic_dw": "task arithmetic (dW, white-box)", "ties": "TIES (dW, white-box)",
          "dare_ties": "DARE-TIES (dW, white-box)", "best_single": "best single adapter"}


@dataclass(frozen=True)
class Settings:
    tasks: tuple[str, ...]
    n: int  # adapters in the pool
    budget: int  # validation queries per method
    popsize: int
    val_examples: int
    test_examples: int
    max_tokens: int  # per example (prompt truncated from the left first)
    batch_tokens: int
    lambdas: tuple[float, ...]
    densities: tuple[float, ...]
    top_k: tuple[int, ...]  # white-box pre-selection sizes; 0 = all N
    seed: int = 42
    methods: tuple[str, ...] = METHODS


FULL = Settings(("dictionary_word", "verse_next", "jargon_define", "code_return"), 20, 200, 20, 48, 160, 64,
                2048, (0.05, 0.1, 0.3, 0.5, 0.7, 1.0), (0.5, 0.7, 0.9, 1.0), (0, 5))
QUICK = Settings(("dictionary_word", "verse_next", "jargon_define"), 20, 24, 8, 12, 24, 48, 2048,
                 (0.05, 0.3, 1.0), (0.5, 0.9), (0,))


def stage_budgets(budget: int, popsize: int) -> tuple[int, int]:
    """Split a budget 1:2 between the stages (paper: 400:800), stage 1 in whole generations if possible."""
    b1 = popsize * round(budget / 3 / popsize) if budget >= 3 * popsize else budget // 3
    return b1, budget - b1


# ------------------------------------------------------------------------------------------------
# the methods; each returns (candidate, validation loss, params) and spends queries through `meter`

Picked = tuple[dict[str, Any], float, dict[str, Any]]


def run_search(name: str, meter: Metered, st: Settings) -> Picked:
    from merging.search import evo_merging, lorahub

    n, (b1, b2) = meter.n, stage_budgets(st.budget, st.popsize)
    common = {"popsize": st.popsize, "seed": st.seed}
    if name in ("lorahub", "lorahub_40"):
        budget = st.budget if name == "lorahub" else min(st.budget, NATIVE_LORAHUB_BUDGET)
        r = lorahub(meter, n, budget=budget, seed=st.seed)
    elif name == "no_denoise":
        r = evo_merging(meter, n, budget_stage1=0, budget_stage2=st.budget, denoise=False, **common)
    elif name == "no_scale":
        r = evo_merging(meter, n, budget_stage1=st.budget, budget_stage2=0, scale=False, **common)
    else:
        negative = name != "no_negative"
        r = evo_merging(meter, n, budget_stage1=b1, budget_stage2=b2, negative=negative, **common)
    stages = [{"stage": s.stage, "queries": s.queries, "loss": s.loss, "stop": s.stop_reason}
              for s in r.stages]
    selected = r.settings.get("stages", {}).get("lorahub", {}).get("selected")  # what NGOpt picked
    params = {"stages": stages, "selected": selected, "best_loss_curve": [h.best_loss for h in r.history]}
    return {"alpha": list(r.alpha), "beta": list(r.beta)}, r.loss, params


def run_fixed(name: str, meter: Metered, st: Settings, ranking: list[float]) -> Picked:
    """uniform, task arithmetic (beta = lambda) and the best single adapter: evaluated candidates."""
    n, ones = meter.n, [1.0] * meter.n
    if name == "uniform":
        cands = [[1.0 / n] * n]
    elif name == "task_arithmetic_beta":
        cands = [[lam] * n for lam in st.lambdas]
    else:  # best_single: the ranking's N queries are this method's
        meter.take(n)
        i = min(range(n), key=lambda j: ranking[j])
        return {"alpha": ones, "beta": [float(j == i) for j in range(n)]}, ranking[i], {"index": i}
    losses = meter.evaluate_many([(ones, c) for c in cands])
    i = min(range(len(cands)), key=lambda j: losses[j])
    params = {"lambda": cands[i][0], "grid": dict(zip(map(str, (c[0] for c in cands)), losses, strict=True))}
    return {"alpha": ones, "beta": cands[i]}, losses[i], params


def run_white_box(name: str, meter: Metered, st: Settings, wb: WhiteBox, val_batches: list[Any],
                  ranking: list[float]) -> Picked:
    """Grid over (top-K, density, lambda) on validation, each point one counted query."""
    method = "task_arithmetic" if name == "task_arithmetic_dw" else name
    if any(st.top_k):
        meter.take(wb.n)  # the single-adapter ranking behind top-K pre-selection
    order = sorted(range(wb.n), key=lambda j: ranking[j])
    densities = (1.0,) if method == "task_arithmetic" else st.densities
    best: tuple[float, dict[str, Any]] = (math.inf, {})
    for k in st.top_k:
        subset = tuple(sorted(order[:k])) if k else tuple(range(wb.n))
        for density in densities:
            mixed = wb.mixed(method, subset, density, st.seed)
            for lam in st.lambdas:
                meter.take(1)
                wb.set(mixed, lam)
                loss = wb.score(val_batches)["loss"]
                if loss < best[0]:
                    best = (loss, {"method": method, "subset": subset, "density": density, "lambda": lam,
                                   "top_k": k or wb.n})
    return {"white_box": best[1]}, best[0], dict(best[1])


def realize(wb: WhiteBox, cand: dict[str, Any], seed: int) -> None:
    if "white_box" in cand:
        c = cand["white_box"]
        wb.set(wb.mixed(c["method"], tuple(c["subset"]), c["density"], seed), c["lambda"])
    elif "alpha" in cand:
        wb.set(wb.evo_deltas(cand["alpha"], cand["beta"]))
    else:
        wb.set(None)


def split_check(btm: Any, task: str, st: Settings) -> dict[str, Any]:
    """Split sizes and exact-duplicate counts between them (validation/test vs train, and each other)."""
    from experts.data.datasets import load_task

    key = lambda e: (e.get("prompt"), e.get("completion"))
    tr = {key(e) for e in load_task(btm, task, "train")}
    va = {key(e) for e in load_task(btm, task, "validation", st.val_examples)}
    te = {key(e) for e in load_task(btm, task, "test", st.test_examples)}
    return {"validation": len(va), "test": len(te), "train": len(tr), "validation&test": len(va & te),
            "validation&train": len(va & tr), "test&train": len(te & tr)}


def run_task(task: str, st: Settings, mgr: Any, wb: WhiteBox, base: str, pool: list[str]) -> dict[str, Any]:
    from experts.evo.sessions import LossOptions, ValidationSpec

    t0 = time.perf_counter()
    loss = LossOptions(max_tokens_per_example=st.max_tokens, batch_tokens=st.batch_tokens)
    val = mgr.create(base, pool, ValidationSpec(task=task, split="validation", max_examples=st.val_examples),
                     loss=loss, budget=10**9)
    test = mgr.create(base, pool, ValidationSpec(task=task, split="test", max_examples=st.test_examples),
                      loss=loss, budget=10**9)
    try:
        out: dict[str, Any] = {"splits": split_check(mgr.btm, task, st), "methods": {},
                               "val": {"examples": val.n_examples, "tokens": val.n_tokens},
                               "test": {"examples": test.n_examples, "tokens": test.n_tokens}}
        t = time.perf_counter()
        one_hot = [[float(j == i) for j in range(val.n)] for i in range(val.n)]
        ranking = val.evaluate_many([([1.0] * val.n, b) for b in one_hot])
        out["seconds_per_query"] = (time.perf_counter() - t) / val.n
        print(f"{task}: validation {val.n_examples} examples / {val.n_tokens} scored tokens, test "
              f"{test.n_examples} / {test.n_tokens}; {out['seconds_per_query']:.3f} s per query", flush=True)
        for name in st.methods:
            out["methods"][name] = run_method(name, st, val, test, wb, ranking)
            r = out["methods"][name]
            print(f"  {task:16s} {name:22s} val {r['val_loss']:.4f} test {r['test_loss']:.4f} "
                  f"acc {r['token_acc']:.3f} em {r['exact']:.3f} q {r['queries']:4d} ({r['seconds']:.1f} s)",
                  flush=True)
        out["seconds"] = round(time.perf_counter() - t0, 1)
        return out
    finally:
        mgr.delete(val.id)
        mgr.delete(test.id)


def run_method(name: str, st: Settings, val: Any, test: Any, wb: WhiteBox, ranking: list[float]) -> dict:
    t = time.perf_counter()
    meter = Metered(val, st.budget)
    if name == "base":
        cand, val_loss, params = {}, float("nan"), {}
    elif name in SEARCHED:
        cand, val_loss, params = run_search(name, meter, st)
    elif name in FIXED:
        cand, val_loss, params = run_fixed(name, meter, st, ranking)
    else:
        cand, val_loss, params = run_white_box(name, meter, st, wb, val.batches, ranking)
    search_s = time.perf_counter() - t
    realize(wb, cand, st.seed)
    if name == "base":
        val_loss = wb.score(val.batches)["loss"]  # not a query: the base is known to everyone
    scores = wb.score(test.batches)
    row = {"val_loss": val_loss, "test_loss": scores["loss"], "token_acc": scores["token_acc"],
           "exact": scores["exact"], "queries": meter.used, "budget": st.budget, "params": params,
           "seconds": round(search_s, 1), **({"alpha": cand["alpha"], "beta": cand["beta"]} if "alpha" in cand
                                             else {})}
    if "alpha" in cand:  # the provider's own test loss for the same (alpha, beta): must agree
        row["test_loss_session"] = test.evaluate(cand["alpha"], cand["beta"])
        row["session_gap"] = abs(row["test_loss_session"] - row["test_loss"])
    return row


# ------------------------------------------------------------------------------------------------
# report


def table(result: dict[str, Any], field: str, digits: int = 4) -> str:
    """Markdown: one row per method, one column per task, plus the mean over tasks."""
    tasks = list(result["tasks"])
    lines = [f"| method | {' | '.join(tasks)} | mean |", "|---" * (len(tasks) + 2) + "|"]
    for name in [m for m in METHODS if m in result["tasks"][tasks[0]]["methods"]]:
        vals = [result["tasks"][t]["methods"][name][field] for t in tasks]
        cells = [f"{v:.{digits}f}" for v in vals] + [f"{sum(vals) / len(vals):.{digits}f}"]
        lines.append(f"| {LABELS[name]} | {' | '.join(cells)} |")
    return "\n".join(lines)


def report(result: dict[str, Any]) -> str:
    parts = []
    for field, title, d in (("test_loss", "test loss (mean token CE, nats; lower is better)", 4),
                            ("token_acc", "test token accuracy (teacher-forced argmax)", 3),
                            ("exact", "test exact match (greedy completion = reference tokens)", 3),
                            ("val_loss", "validation loss of the selected candidate (the search's CE)", 4),
                            ("queries", "validation queries used (budget per method: "
                             f"{result['settings']['budget']})", 0)):
        parts.append(f"### {title}\n\n{table(result, field, d)}")
    return "\n\n".join(parts)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole reproduction; returns the JSON-able result (also written to args.out)."""
    from transformers.utils import logging as hf_logging

    from experts.btm.operations import BTM
    from experts.evo.pool import FULL as POOL_FULL
    from experts.evo.pool import QUICK as POOL_QUICK
    from experts.evo.pool import build_pool
    from experts.evo.sessions import MergeSessionManager
    from experts.runtime import open_repository

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # NGOpt's Cobyla (LoraHub) makes scipy warn that nevergrad's rhoend > rhobeg and resets it; harmless
    warnings.filterwarnings("ignore", message="COBYLA: Invalid RHOEND")
    torch.set_num_threads(args.threads)
    st = QUICK if args.quick else FULL
    over = {k: v for k, v in (("budget", args.budget), ("n", args.n), ("val_examples", args.val_examples),
                              ("test_examples", args.test_examples), ("seed", args.seed)) if v is not None}
    st = replace(st, **over, **({"tasks": tuple(args.tasks.split(","))} if args.tasks else {}))
    if args.methods:
        unknown = set(args.methods.split(",")) - set(METHODS)
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
        st = replace(st, methods=tuple(m for m in METHODS if m in args.methods.split(",") or m == "base"))
    t0 = time.perf_counter()
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    repo = open_repository(data_dir, database_url=f"sqlite:///{(data_dir / 'registry.db').resolve()}",
                           max_loaded_models=2, max_loaded_bytes=1 << 30)
    try:
        pool = build_pool(repo, st.n, quick=args.quick, prefix=args.prefix)
        pool_s = time.perf_counter() - t0
        print(f"pool: {pool['base']} + {len(pool['adapters'])} adapters ({pool['trained']} trained now, "
              f"{pool_s:.0f} s)\nsettings: {json.dumps(asdict(st))}; Evo stage budgets "
              f"{stage_budgets(st.budget, st.popsize)}", flush=True)
        btm = BTM(repo, data_dir, (POOL_QUICK if args.quick else POOL_FULL).corpus_bytes)
        mgr = MergeSessionManager(repo, btm=btm, max_sessions=4)
        wb = WhiteBox(repo.artifact_dir(repo.record(pool["base"])),
                      [repo.artifact_dir(repo.record(a)) for a in pool["adapters"]])
        result: dict[str, Any] = {"settings": asdict(st), "threads": args.threads, "tasks": {},
                                  "pool": {**pool, "seconds_this_run": round(pool_s, 1)}}
        t1 = time.perf_counter()
        for task in st.tasks:
            result["tasks"][task] = run_task(task, st, mgr, wb, pool["base"], pool["adapters"])
        result["seconds_methods"] = round(time.perf_counter() - t1, 1)
        result["seconds_total"] = round(time.perf_counter() - t0, 1)
        result["command"] = " ".join(["python", "bench/evo_repro.py", *(args.argv or [])])
    finally:
        repo.close()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=_json_default))
    return result


def _json_default(x: Any) -> Any:
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(type(x))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="bench/out/evo_data", help="MergeGate data dir holding the pool")
    p.add_argument("--quick", action="store_true", help="tiny pool, budgets and data (CI)")
    p.add_argument("--tasks", help="comma-separated held-out tasks (default: see FULL / QUICK)")
    p.add_argument("--budget", type=int, help="validation queries per method")
    p.add_argument("--methods", help="comma-separated subset of the methods (default all; base always runs)")
    p.add_argument("--n", type=int, help="adapters in the pool (default 20)")
    p.add_argument("--val-examples", type=int)
    p.add_argument("--test-examples", type=int)
    p.add_argument("--seed", type=int, help="CMA / NGOpt / DARE seed (default 42, the authors')")
    p.add_argument("--prefix", default="pool", help="pool prefix for build_pool")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    p.add_argument("--out", help="write the result JSON here")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    print(f"\n{report(result)}\n\nwall time: {result['seconds_total']:.0f} s (methods "
          f"{result['seconds_methods']:.0f} s, pool {result['pool']['seconds_this_run']:.0f} s), "
          f"{args.threads} thread(s); command: {result['command']}")
    return result


if __name__ == "__main__":
    main()
