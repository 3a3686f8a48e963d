"""Tables for bench/btm_repro.py: per-seed results -> means with spread over seeds, paired against dense.

Perplexities are per token (one tokenizer for every model); a family's in-domain figure is the mean of its
per-domain perplexities over the training domains, out-of-domain over the held-out ones (spec §4)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

METHODS = ["dense", "btm_ensemble", "btm_ensemble_reference", "btm_ensemble_top1", "btm_ensemble_uniform_prior",
           "btm_posterior_average", "btm_uniform_average", "random_ensemble", "random_ensemble_reference",
           "random_uniform_average", "seed"]


def _mean_ppl(nll: dict[str, float], domains: list[str]) -> float:
    return sum(math.exp(nll[d]) for d in domains) / len(domains)


def _stats(xs: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else None,
            "min": min(xs), "max": max(xs), "seeds": len(xs)}


def _fmt(s: dict[str, Any], digits: int = 2) -> str:
    sd = f" ± {s['sd']:.{digits}f}" if s["sd"] is not None else ""
    return f"{s['mean']:.{digits}f}{sd}"


def summarize(results: Path, out: Path) -> dict[str, Any]:
    runs = [json.loads(p.read_text()) for p in sorted(Path(results).glob("*.json"))]
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["n"], r["T"]), []).append(r)
    table: list[dict[str, Any]] = []
    for (n, T), rs in sorted(groups.items()):
        row: dict[str, Any] = {"n": n, "T": T, "seeds": sorted(r["seed"] for r in rs), "methods": {}}
        for m in METHODS:
            if not all(m in r["nll"] for r in rs):
                continue
            entry = {}
            for split in ("in_domain", "out_of_domain"):
                doms = [r["train_domains"] if split == "in_domain" else r["held_out"] for r in rs]
                vals = [_mean_ppl(r["nll"][m], d) for r, d in zip(rs, doms, strict=True)]
                dense = [_mean_ppl(r["nll"]["dense"], d) for r, d in zip(rs, doms, strict=True)]
                entry[split] = _stats(vals)
                entry[f"{split}_minus_dense"] = _stats([v - w for v, w in zip(vals, dense, strict=True)])
                entry[f"{split}_per_seed"] = vals
            entry["per_domain"] = {d: _stats([math.exp(r["nll"][m][d]) for r in rs]) for d in rs[0]["eval_domains"]}
            row["methods"][m] = entry
        row["plan"] = rs[0]["plan"]
        row["seconds"] = sum(r["seconds"] for r in rs)
        table.append(row)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"cells": len(runs), "rows": table}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(table) + "\n")
    return summary


def markdown(table: list[dict[str, Any]]) -> str:
    lines = []
    for row in table:
        p = row["plan"]
        lines += [f"### n = {row['n']} training domains, T = {row['T']:,} tokens, seeds {row['seeds']}",
                  f"(N = {p['total_steps']} dense updates at batch {p['dense_batch']}, seed S = {p['seed_steps']}; "
                  f"experts {p['expert_updates']} updates at batch {p['expert_batch']}; {row['seconds']:.0f} s)", "",
                  "| method | in-domain ppl | − dense | out-of-domain ppl | − dense |", "|---|---|---|---|---|"]
        for m, e in row["methods"].items():
            lines.append(f"| {m} | {_fmt(e['in_domain'])} | {_fmt(e['in_domain_minus_dense'])} | "
                         f"{_fmt(e['out_of_domain'])} | {_fmt(e['out_of_domain_minus_dense'])} |")
        lines.append("")
    return "\n".join(lines)
