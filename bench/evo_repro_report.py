"""Tables for bench/evo_repro.py: results.json -> markdown (means with spread over seeds, paired wins).

    python bench/evo_repro_report.py docs/data/evo/results.json

Every figure is computed from the runs in the file: a method's mean and sample standard deviation over the
seeds it ran, and paired comparisons (same target, same seed, same test set) as mean difference, its spread
and wins / ties / losses.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

LABELS = {"evo_merging": "Evo-Merging (400 + 800)", "lorahub": "LoraHub (NGOpt, 1,200)",
          "lorahub_40": "LoraHub at its own 40", "no_denoise": "w/o denoising (0 + 1,200)",
          "no_negative": "w/o sign-aware scaling (beta >= 0)", "stage1_beta_sqrt": "stage 1 at beta = 1/sqrt(N)",
          "no_scale": "w/o scaling (1,200 + 0)", "sigma0_0.15": "sigma0 0.15 (both stages)",
          "sigma0_0.3": "sigma0 0.3 (both stages)", "uniform": "uniform average (alpha 1, beta 1/N)",
          "best_single": "best single adapter (on validation)", "base": "base (no adapter)"}
ORDER = list(LABELS)


def stats(xs: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def fmt(xs: list[float], digits: int) -> str:
    m, sd = stats(xs)
    return f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def by_key(runs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[Any, dict[str, Any]]]:
    """(target, method) -> {seed: run}."""
    out: dict[tuple[str, str], dict[Any, dict[str, Any]]] = defaultdict(dict)
    for r in runs:
        out[(r["target"], r["method"])][r["seed"]] = r
    return out


def targets_of(res: dict[str, Any]) -> list[str]:
    """The targets with runs, in the settings' order (runs for one target may come from separate invocations)."""
    have = {r["target"] for r in res["runs"]}
    order = [*res["settings"]["targets"], *sorted(have)]
    return [t for i, t in enumerate(order) if t in have and t not in order[:i]]


def method_table(res: dict[str, Any], methods: list[str]) -> str:
    runs = by_key(res["runs"])
    targets = targets_of(res)
    lines = ["| target | method | seeds | test exact match | test CE (nats) | validation CE | queries |",
             "|---|---|---|---|---|---|---|"]
    for t in targets:
        for m in methods:
            rs = list(runs.get((t, m), {}).values())
            if not rs:
                continue
            n = f"{len(rs)} (identical)" if seed_free(rs) else (
                f"{len(rs)} (deterministic)" if len(rs) == 1 and m in deterministic(runs) else str(len(rs)))
            lines.append(f"| {t} | {LABELS[m]} | {n} | {fmt([r['test_exact'] for r in rs], 3)} | "
                         f"{fmt([r['test_loss'] for r in rs], 4)} | {fmt([r['val_loss'] for r in rs], 4)} | "
                         f"{rs[0]['queries']} |")
    return "\n".join(lines)


def paired(res: dict[str, Any], a: str, b: str) -> list[dict[str, Any]]:
    """Per target (and all targets pooled): a - b over the seeds both ran, on exact match and CE."""
    runs = by_key(res["runs"])
    rows = []
    pooled: dict[str, list[float]] = {"em": [], "ce": []}
    for t in targets_of(res):
        ra, rb = runs.get((t, a), {}), dict(runs.get((t, b), {}))
        if rb and (seed_free(list(rb.values())) or b in deterministic(runs)):  # it stands for every seed
            rb.update({s: next(iter(rb.values())) for s in ra if s not in rb})
        seeds = sorted(set(ra) & set(rb))
        if not seeds:
            continue
        em = [ra[s]["test_exact"] - rb[s]["test_exact"] for s in seeds]
        ce = [ra[s]["test_loss"] - rb[s]["test_loss"] for s in seeds]
        pooled["em"] += em
        pooled["ce"] += ce
        rows.append({"target": t, "seeds": len(seeds), "em": em, "ce": ce})
    if len(rows) > 1:
        rows.append({"target": "all targets", "seeds": len(pooled["em"]), **pooled})
    return rows


def deterministic(runs: dict[tuple[str, str], dict[Any, dict[str, Any]]]) -> set[str]:
    """Methods that gave identical coefficients for 2+ seeds on some target: their optimiser draws no random
    numbers, so one run on another target stands for every seed there too."""
    return {m for (_, m), rs in runs.items() if seed_free(list(rs.values()))}


def seed_free(rs: list[dict[str, Any]]) -> bool:
    """True when 2+ seeds of a search gave the same coefficients (LoraHub's Cobyla uses no randomness)."""
    return len(rs) >= 2 and all(r["beta"] == rs[0]["beta"] and r["alpha"] == rs[0]["alpha"] for r in rs)


def wins(diffs: list[float], lower_is_better: bool) -> str:
    eps = 1e-9
    w = sum(d < -eps if lower_is_better else d > eps for d in diffs)
    loss = sum(d > eps if lower_is_better else d < -eps for d in diffs)
    return f"{w} / {len(diffs) - w - loss} / {loss}"


def paired_table(res: dict[str, Any], a: str, b: str) -> str:
    lines = [f"| target | pairs | exact match: {a} − {b} | wins / ties / losses (EM) | CE: {a} − {b} | "
             "wins / ties / losses (CE) |", "|---|---|---|---|---|---|"]
    for r in paired(res, a, b):
        lines.append(f"| {r['target']} | {r['seeds']} | {fmt(r['em'], 3)} | {wins(r['em'], False)} | "
                     f"{fmt(r['ce'], 4)} | {wins(r['ce'], True)} |")
    return "\n".join(lines)


def signal_table(res: dict[str, Any]) -> str:
    lines = ["| target | beta | alpha vectors | CE at alpha = 1 | CE range over alpha | 0.05 · Δ mean(alpha) | "
             "ratio | rank corr. (CE, mean alpha) |", "|---|---|---|---|---|---|---|---|"]
    for t, sig in res["signal"].items():
        for key, v in sig.items():
            if not key.startswith("beta="):
                continue
            beta, vectors = key.removeprefix("beta=").split("/", 1) if key.count("/") == 1 else (
                key.removeprefix("beta=").rsplit("/", 1))
            ratio = v["loss_range"] / v["l1_range"] if v["l1_range"] else float("inf")
            lines.append(f"| {t} | {beta} = {v['beta']:.3f} | {vectors} | {v['loss_at_alpha_1']:.4f} | "
                         f"{v['loss_range']:.5f} | {v['l1_range']:.5f} | {ratio:.2f} | "
                         f"{v['rank_corr_loss_vs_mean_alpha']:+.2f} |")
    return "\n".join(lines)


def singles_table(res: dict[str, Any]) -> str:
    """Each adapter alone (alpha 1, beta one-hot) on each target: test exact match; plus its own task."""
    targets = list(res["signal"])
    train = res.get("pool_train", {})
    head = " | ".join(f"EM on {t}" for t in targets)
    lines = [f"| adapter | role | own-task val EM (after training) | {head} |", "|---|---|---|" + "---|" * len(targets)]
    first = res["signal"][targets[0]]["singles"]
    for i, s in enumerate(first):
        own = (train.get(s["adapter"]) or {}).get("final_val_exact")
        cells = " | ".join(f"{res['signal'][t]['singles'][i]['test_exact']:.3f}" for t in targets)
        lines.append(f"| {s['task']} | {s['role']} | {'-' if own is None else f'{own:.3f}'} | {cells} |")
    return "\n".join(lines)


def report(res: dict[str, Any]) -> str:
    main = ["evo_merging", "lorahub", "lorahub_40", "uniform", "best_single", "base"]
    abl = ["evo_merging", "no_denoise", "no_negative", "stage1_beta_sqrt", "no_scale"]
    parts = [("Single adapters", singles_table(res)), ("Stage-1 signal", signal_table(res)),
             ("Main comparison", method_table(res, main)),
             ("Paired: Evo-Merging vs LoraHub (1,200)", paired_table(res, "evo_merging", "lorahub")),
             ("Paired: Evo-Merging vs LoraHub (40)", paired_table(res, "evo_merging", "lorahub_40")),
             ("Ablations", method_table(res, abl))]
    parts += [(f"Paired: {m} vs Evo-Merging", paired_table(res, m, "evo_merging")) for m in abl[1:]]
    sweep = ["evo_merging", "sigma0_0.15", "sigma0_0.3", "lorahub"]
    if any(r["method"] in sweep[1:3] for r in res["runs"]):
        parts += [("sigma0 sweep", method_table(res, sweep))]
        parts += [(f"Paired: {m} vs Evo-Merging", paired_table(res, m, "evo_merging")) for m in sweep[1:3]]
    return "\n\n".join(f"### {title}\n\n{body}" for title, body in parts)


if __name__ == "__main__":
    print(report(json.loads(Path(sys.argv[1]).read_text())))
