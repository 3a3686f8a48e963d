"""Evo-Merging (Chen et al. 2025, arXiv:2509.12951) vs LoraHub on the structured pool, resumable.

    python bench/evo_repro.py --data-dir /work/runs/evo/data --out /work/runs/evo/state --threads 1
    python bench/evo_repro.py --quick --data-dir /tmp/evo-q --out /tmp/evo-q-state          # tiny, minutes

The pool (:mod:`experts.evo.task_pool`): a byte-level base and N = 24 LoRA adapters trained on structured
tasks with exact-match answers (members, auxiliary, synergistic, irrelevant adapters and five distractors
trained on shuffled labels). Targets: ``mix3`` (three member tasks interleaved: in-distribution) and the
unseen tasks ``rev/digits`` and ``sort/upper`` (no adapter trained on them). Per target, one merge session
on its validation split (the searches' only signal) and a white-box copy of the base for the test split.

Steps, each written to the --out directory as soon as it is done (a killed run resumes where it stopped):

1. ``signal/<target>.json``: stage 1's signal before any search: the validation loss over alpha vectors
   (the first CMA generation around alpha = 1, sigma0 0.05, and alpha uniform in [0, 1]^N) at beta = 1/N
   and at beta = 1/sqrt(N), against the L1 term's spread 0.05 * (max - min) of mean(alpha); and every
   single adapter's validation loss and test exact match (the pool's roles, seen by the targets);
2. ``runs/<target>/<seed>/<method>.json``: one search (or fixed merge) per target, seed and method, scored
   on the test split (CE, token accuracy, exact match); searches get the paper's settings (popsize 20,
   sigma0 0.05, stage budgets 400 + 800; LoraHub NGOpt at 1,200 and at its own 40);
3. ``results.json``: everything above in one file (``bench/evo_repro_report.py`` makes the tables).

Methods run in phases (all seeds of the main comparison first, then the ablations), so a run cut short
still holds complete paired comparisons. Progress lines carry UTC timestamps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/build_pool.py

import torch

from bench.evo_whitebox import Metered, WhiteBox
from experts.evo.sessions import LossOptions, MergeSessionManager, ValidationSpec
from experts.evo.task_pool import FULL as POOL_FULL
from experts.evo.task_pool import MEMBERS, build_task_pool, target_examples
from experts.evo.task_pool import QUICK as POOL_QUICK
from experts.runtime import open_repository
from merging.search import evo_merging, lorahub

MAIN = ("evo_merging", "lorahub", "lorahub_40")
ABLATIONS = ("no_denoise", "no_negative", "stage1_beta_sqrt", "no_scale")
SIGMA_SWEEP = ("sigma0_0.15", "sigma0_0.3")  # CMA's initial step in both stages (the paper's 0.05 is MAIN)
FIXED = ("base", "uniform", "best_single")


@dataclass(frozen=True)
class Settings:
    targets: tuple[str, ...] = ("mix3", "rev/digits", "sort/upper")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    budget_stage1: int = 400
    budget_stage2: int = 800
    lorahub_budget: int = 1200
    lorahub_own: int = 40
    popsize: int = 20
    sigma0: float = 0.05
    l1: float = 0.05
    val_examples: int = 300
    test_examples: int = 500
    max_tokens: int = 48
    batch_tokens: int = 4096
    methods: tuple[str, ...] = MAIN + ABLATIONS + SIGMA_SWEEP


QUICK = Settings(("mix3", "rev/digits"), (0, 1), 20, 40, 60, 10, 10, 0.05, 0.05, 40, 40)


def stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def say(out: Path, line: str) -> None:
    """A progress line with a UTC timestamp, on stdout and appended to <out>/progress.log."""
    text = f"{stamp()} {line}"
    print(text, flush=True)
    with (out / "progress.log").open("a") as f:
        f.write(text + "\n")


def write_json(path: Path, obj: Any) -> None:
    """Atomic: a killed run never leaves half a file behind (a missing file is redone)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes sharing one state dir never collide
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def run_path(out: Path, target: str, seed: int | None, method: str) -> Path:
    return out / "runs" / target.replace("/", "-") / ("fixed" if seed is None else f"seed{seed}") / f"{method}.json"


def jobs(st: Settings) -> list[tuple[str, int | None, str]]:
    """(target, seed, method) in run order: fixed merges, then the main methods for every seed, then the
    ablations for every seed (a run cut short still holds whole seeds of the main comparison)."""
    out: list[tuple[str, int | None, str]] = [(t, None, m) for t in st.targets for m in FIXED]
    for phase in (MAIN, ABLATIONS, SIGMA_SWEEP):
        out += [(t, s, m) for s in st.seeds for t in st.targets for m in phase if m in st.methods]
    return out


def search(method: str, meter: Metered, st: Settings, seed: int) -> tuple[list[float], list[float], float, dict]:
    """One search on the validation session; returns (alpha, beta, best validation loss, details)."""
    n = meter.n
    evo = {"popsize": st.popsize, "sigma0": st.sigma0, "l1": st.l1, "seed": seed,
           "budget_stage1": st.budget_stage1, "budget_stage2": st.budget_stage2}
    total = st.budget_stage1 + st.budget_stage2
    if method in ("lorahub", "lorahub_40"):
        budget = st.lorahub_budget if method == "lorahub" else st.lorahub_own
        r = lorahub(meter, n, budget=budget, l1=st.l1, seed=seed)
    elif method == "no_denoise":  # the whole budget to stage 2, alpha = 1
        r = evo_merging(meter, n, **{**evo, "budget_stage1": 0, "budget_stage2": total}, denoise=False)
    elif method == "no_scale":  # the whole budget to stage 1, beta = 1/N
        r = evo_merging(meter, n, **{**evo, "budget_stage1": total, "budget_stage2": 0}, scale=False)
    elif method == "no_negative":  # no sign-aware scaling: beta in [0, 1.5]
        r = evo_merging(meter, n, **evo, negative=False)
    elif method in SIGMA_SWEEP:  # the same two stages with a larger initial CMA step
        r = evo_merging(meter, n, **{**evo, "sigma0": float(method.split("_", 1)[1])})
    elif method == "stage1_beta_sqrt":  # stage 1 at beta = 1/sqrt(N): a merged update that moves the loss
        r = evo_merging(meter, n, **evo, stage1_beta=1.0 / math.sqrt(n))
    else:
        r = evo_merging(meter, n, **evo)
    curve = [h.best_loss for h in r.history]
    details = {"stages": [{"stage": s.stage, "queries": s.queries, "loss": s.loss, "stop": s.stop_reason}
                          for s in r.stages],
               "curve_every_20": curve[19::20], "settings": {k: v for k, v in r.settings.items()
                                                            if isinstance(v, int | float | str | bool | None)}}
    return list(map(float, r.alpha)), list(map(float, r.beta)), float(r.loss), details


class Target:
    """One target's sessions (validation: the signal; test: the report's cross-check) and test batches."""

    def __init__(self, mgr: MergeSessionManager, base: str, pool: list[str], target: str, st: Settings) -> None:
        loss = LossOptions(max_tokens_per_example=st.max_tokens, batch_tokens=st.batch_tokens)
        self.val = mgr.create(base, pool, ValidationSpec(examples=tuple(target_examples(
            target, "validation", st.val_examples))), loss=loss, budget=10**9)
        self.test = mgr.create(base, pool, ValidationSpec(examples=tuple(target_examples(
            target, "test", st.test_examples))), loss=loss, budget=10**9)
        self.singles: list[float] | None = None

    def single_losses(self) -> list[float]:
        if self.singles is None:
            n = self.val.n
            self.singles = self.val.evaluate_many([([1.0] * n, [float(j == i) for j in range(n)])
                                                   for i in range(n)])
        return self.singles


def scored(wb: WhiteBox, tg: Target, alpha: list[float] | None, beta: list[float] | None) -> dict[str, Any]:
    """Test CE, token accuracy and exact match of (alpha, beta) (None: the base), with the session's CE."""
    wb.set(None if alpha is None else wb.evo_deltas(alpha, beta))
    s = wb.score(tg.test.batches)
    row = {"test_loss": s["loss"], "test_token_acc": s["token_acc"], "test_exact": s["exact"]}
    if alpha is not None:
        row["session_gap"] = abs(tg.test.evaluate(alpha, beta) - s["loss"])
    return row


def signal(tg: Target, wb: WhiteBox, st: Settings, roles: list[dict[str, Any]]) -> dict[str, Any]:
    """Stage 1's signal: loss spread over alpha vs the L1 term's spread, at beta = 1/N and 1/sqrt(N)."""
    n, rng = tg.val.n, random.Random(0)
    cma = [[min(1.0, max(0.0, rng.gauss(1.0, st.sigma0))) for _ in range(n)] for _ in range(st.popsize)]
    uni = [[rng.random() for _ in range(n)] for _ in range(st.popsize)]
    out: dict[str, Any] = {}
    for label, b in (("1/N", 1.0 / n), ("1/sqrt(N)", 1.0 / math.sqrt(n))):
        for name, alphas in (("cma_gen1", [[1.0] * n, *cma]), ("uniform_alpha", [[1.0] * n, *uni])):
            losses = tg.val.evaluate_many([(a, [b] * n) for a in alphas])
            means = [sum(a) / n for a in alphas]
            out[f"beta={label}/{name}"] = {
                "beta": b, "loss_at_alpha_1": losses[0], "loss_min": min(losses), "loss_max": max(losses),
                "loss_range": max(losses) - min(losses), "l1_range": st.l1 * (max(means) - min(means)),
                "rank_corr_loss_vs_mean_alpha": _spearman(losses, means)}
    singles = tg.single_losses()
    base_val = tg.val.evaluate([1.0] * n, [0.0] * n)
    out["base_val_loss"] = base_val
    out["singles"] = []
    for i, (loss, role) in enumerate(zip(singles, roles, strict=True)):
        beta = [float(j == i) for j in range(n)]
        out["singles"].append({**role, "val_loss": loss, **scored(wb, tg, [1.0] * n, beta)})
    return out


def _spearman(x: list[float], y: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for k, i in enumerate(order):
            r[i] = float(k)
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx and vy else 0.0


def run_one(tg: Target, wb: WhiteBox, st: Settings, seed: int | None, method: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    n = tg.val.n
    budget = st.lorahub_own if method == "lorahub_40" else (
        st.lorahub_budget if method == "lorahub" else st.budget_stage1 + st.budget_stage2)
    meter = Metered(tg.val, budget)
    details: dict[str, Any] = {}
    if method == "base":
        alpha, beta, val_loss = None, None, tg.val.evaluate([1.0] * n, [0.0] * n)
    elif method == "uniform":
        alpha, beta = [1.0] * n, [1.0 / n] * n
        val_loss = meter.evaluate(alpha, beta)
    elif method == "best_single":
        meter.take(n)  # the ranking's N queries
        singles = tg.single_losses()
        i = min(range(n), key=lambda j: singles[j])
        alpha, beta, val_loss, details = [1.0] * n, [float(j == i) for j in range(n)], singles[i], {"index": i}
    else:
        assert seed is not None
        alpha, beta, val_loss, details = search(method, meter, st, seed)
    row = {"method": method, "seed": seed, "val_loss": val_loss, "queries": meter.used, "budget": budget,
           "search_seconds": round(time.perf_counter() - t0, 1), "alpha": alpha, "beta": beta, **details}
    row.update(scored(wb, tg, alpha, beta))
    return row


def collect(out: Path) -> dict[str, Any]:
    """Every finished file under <out> in one dict (what results.json holds)."""
    meta = json.loads((out / "meta.json").read_text())
    res: dict[str, Any] = {**meta, "signal": {}, "runs": []}
    for p in sorted((out / "signal").glob("*.json")):
        res["signal"][p.stem.replace("-", "/", 1)] = json.loads(p.read_text())
    for p in sorted((out / "runs").rglob("*.json")):
        res["runs"].append({"target": p.parent.parent.name.replace("-", "/", 1), **json.loads(p.read_text())})
    return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    warnings.filterwarnings("ignore", message="COBYLA: Invalid RHOEND")  # nevergrad's Cobyla, harmless
    torch.set_num_threads(args.threads)
    st = QUICK if args.quick else Settings()
    if args.seeds:
        st = replace(st, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.targets:
        st = replace(st, targets=tuple(args.targets.split(",")))
    if args.methods:
        st = replace(st, methods=tuple(args.methods.split(",")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    repo = open_repository(data, database_url=f"sqlite:///{(data / 'registry.db').resolve()}",
                           max_loaded_models=2, max_loaded_bytes=1 << 30)
    t0 = time.perf_counter()
    try:
        say(out, f"pool: building or reusing in {data}")
        pool = build_task_pool(repo, quick=args.quick, prefix=args.prefix, echo=lambda s: say(out, s))
        say(out, f"pool ready: {pool['base']} + {len(pool['adapters'])} adapters ({pool['trained']} trained now)")
        records = {a: repo.record(a) for a in [pool["base"], *pool["adapters"]]}
        meta = {"settings": asdict(st), "pool": pool, "threads": args.threads,
                "pool_config": asdict(POOL_QUICK if args.quick else POOL_FULL),
                "pool_train": {a: records[a].lineage.get("train") for a in records},
                "command": " ".join(["python", "bench/evo_repro.py", *args.argv])}
        write_json(out / "meta.json", meta)
        mgr = MergeSessionManager(repo, max_sessions=4)
        wb = WhiteBox(repo.artifact_dir(records[pool["base"]]),
                      [repo.artifact_dir(records[a]) for a in pool["adapters"]])
        roles = [{"adapter": a, "task": m.task, "role": m.role} for a, m in zip(pool["adapters"], MEMBERS, strict=True)]
        todo = jobs(st)
        targets: dict[str, Target] = {}
        try:
            for k, (target, seed, method) in enumerate(todo):
                path = run_path(out, target, seed, method)
                if path.exists():
                    continue
                if target not in targets:
                    for old in list(targets):  # one target's sessions at a time
                        mgr.delete(targets[old].val.id)
                        mgr.delete(targets.pop(old).test.id)
                    targets[target] = Target(mgr, pool["base"], pool["adapters"], target, st)
                    sig = out / "signal" / f"{target.replace('/', '-')}.json"
                    if not sig.exists():  # before any search on this target
                        t = time.perf_counter()
                        write_json(sig, signal(targets[target], wb, st, roles))
                        say(out, f"{target}: stage-1 signal and single adapters ({time.perf_counter() - t:.0f} s)")
                row = run_one(targets[target], wb, st, seed, method)
                write_json(path, row)
                say(out, f"[{k + 1}/{len(todo)}] {target} seed {seed} {method}: val {row['val_loss']:.4f} test CE "
                         f"{row['test_loss']:.4f} EM {row['test_exact']:.3f} ({row['queries']} q, "
                         f"{row['search_seconds']:.0f} s)")
        finally:
            for tg in targets.values():
                mgr.delete(tg.val.id)
                mgr.delete(tg.test.id)
    finally:
        repo.close()
    result = collect(out)
    result["seconds_this_invocation"] = round(time.perf_counter() - t0, 1)
    write_json(out / "results.json", result)
    say(out, f"done: {len(result['runs'])} runs in {out / 'results.json'}")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="MergeGate data dir holding (or receiving) the pool")
    p.add_argument("--out", required=True, help="state directory: progress.log, signal/, runs/, results.json")
    p.add_argument("--quick", action="store_true", help="tiny pool and budgets (a smoke run)")
    p.add_argument("--seeds", help="comma-separated search seeds (default 0,1,2,3,4)")
    p.add_argument("--targets", help="comma-separated targets (default mix3,rev/digits,sort/upper)")
    p.add_argument("--methods", help=f"comma-separated subset of {', '.join(MAIN + ABLATIONS + SIGMA_SWEEP)}")
    p.add_argument("--prefix", default="tpool", help="the pool's expert-id prefix")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


if __name__ == "__main__":
    run(parse_args())
