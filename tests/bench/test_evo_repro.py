"""bench/evo_repro.py's bookkeeping (run order, resumable state) and bench/evo_repro_report.py's paired
statistics, on made-up results (the end-to-end run is `python bench/evo_repro.py --quick`)."""

from __future__ import annotations

import json

from bench import evo_repro, evo_repro_report


def test_whole_seeds_of_the_main_comparison_come_before_any_ablation():
    st = evo_repro.Settings(targets=("mix3", "rev/digits"), seeds=(0, 1))
    order = evo_repro.jobs(st)
    methods = [m for _, _, m in order]
    assert methods[:6] == ["base", "uniform", "best_single"] * 2
    last_main = max(i for i, m in enumerate(methods) if m in evo_repro.MAIN)
    first_ablation = min(i for i, m in enumerate(methods) if m in evo_repro.ABLATIONS)
    first_sweep = min(i for i, m in enumerate(methods) if m in evo_repro.SIGMA_SWEEP)
    assert last_main < first_ablation
    assert max(i for i, m in enumerate(methods) if m in evo_repro.ABLATIONS) < first_sweep
    phases = len(evo_repro.MAIN) + len(evo_repro.ABLATIONS) + len(evo_repro.SIGMA_SWEEP)
    assert len(order) == 6 + 2 * 2 * phases
    assert len(set(order)) == len(order)


def test_finished_runs_are_files_and_collected(tmp_path):
    evo_repro.write_json(tmp_path / "meta.json", {"settings": {"targets": ["rev/digits"]}})
    path = evo_repro.run_path(tmp_path, "rev/digits", 3, "lorahub")
    assert path == tmp_path / "runs" / "rev-digits" / "seed3" / "lorahub.json"
    evo_repro.write_json(path, {"method": "lorahub", "seed": 3, "test_exact": 0.5})
    assert not list(tmp_path.rglob("*.tmp"))
    res = evo_repro.collect(tmp_path)
    assert res["runs"] == [{"target": "rev/digits", "method": "lorahub", "seed": 3, "test_exact": 0.5}]


def _run(target: str, method: str, seed: int, em: float, ce: float) -> dict:
    return {"target": target, "method": method, "seed": seed, "test_exact": em, "test_loss": ce, "val_loss": ce,
            "queries": 1200, "alpha": [1.0], "beta": [em]}


def test_paired_comparison_counts_wins_per_seed():
    runs = [_run("a", "evo_merging", s, em, 1.0 - em) for s, em in enumerate((0.5, 0.6, 0.4))]
    runs += [_run("a", "lorahub", s, em, 1.0 - em) for s, em in enumerate((0.4, 0.6, 0.5))]
    res = {"settings": {"targets": ["a"]}, "runs": runs}
    (row,) = evo_repro_report.paired(res, "evo_merging", "lorahub")
    assert row["seeds"] == 3
    assert evo_repro_report.wins(row["em"], lower_is_better=False) == "1 / 1 / 1"
    table = evo_repro_report.paired_table(res, "evo_merging", "lorahub")
    assert "| a | 3 | 0.000 ± 0.100 | 1 / 1 / 1 |" in table
    assert json.dumps(res)  # the report reads plain JSON


def test_a_deterministic_baseline_is_paired_with_every_seed():
    runs = [_run("a", "evo_merging", s, 0.1 * s, 1.0) for s in range(4)]
    runs += [_run("a", "lorahub", s, 0.15, 1.0) for s in range(2)]  # seeds 0 and 1 identical
    (row,) = evo_repro_report.paired({"settings": {"targets": ["a"]}, "runs": runs}, "evo_merging", "lorahub")
    assert row["seeds"] == 4
    assert evo_repro_report.wins(row["em"], lower_is_better=False) == "2 / 0 / 2"


def test_a_baseline_shown_deterministic_on_one_target_stands_for_every_seed_on_another():
    runs = [_run(t, "evo_merging", s, 0.1 * s, 1.0) for t in ("a", "b") for s in range(3)]
    runs += [_run("a", "lorahub", s, 0.15, 1.0) for s in range(2)]  # identical: the optimiser is seed-free
    runs += [_run("b", "lorahub", 0, 0.05, 1.0)]  # one run on target b
    rows = evo_repro_report.paired({"settings": {"targets": ["a", "b"]}, "runs": runs}, "evo_merging", "lorahub")
    assert [(r["target"], r["seeds"]) for r in rows] == [("a", 3), ("b", 3), ("all targets", 6)]
    runs_other = [r for r in runs if not (r["target"] == "a" and r["method"] == "lorahub")]
    (only,) = evo_repro_report.paired({"settings": {"targets": ["b"]}, "runs": runs_other}, "evo_merging", "lorahub")
    assert only["seeds"] == 1  # without that evidence, one run pairs with its own seed only
