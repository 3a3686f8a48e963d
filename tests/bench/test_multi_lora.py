"""bench/multi_lora.py's arithmetic: request spreading, the memory and speed figures, metric parsing."""

from __future__ import annotations

from bench import multi_lora as ml


def test_spread_round_robins_models_and_texts():
    bodies = ml.spread(["a", "b", "c"], ["x", "y"], 7)
    assert [b["model"] for b in bodies] == ["a", "b", "c", "a", "b", "c", "a"]
    assert [b["prompt"] for b in bodies] == ["x", "y"] * 3 + ["x"]
    assert all(b["temperature"] == 0 and b["max_tokens"] == ml.NEW_TOKENS for b in bodies)


def test_memory_figures():
    mib = 1 << 20
    m = ml.memory_figures(16 * mib, 10 * mib, 12 * mib, 300 * mib, 20, accounted=26 * mib)
    assert m["resident_bytes"] == 28 * mib and m["target_bytes"] == 31 * mib and m["met"]
    assert m["resident_over_target"] == round(28 / 31, 3) and m["growth_over_adapters"] == 1.2
    assert m["merged_resident_bytes"] == 316 * mib and m["merged_over_resident"] == round(316 / 28, 2)
    assert m["merged_accounted_bytes"] == 320 * mib and m["accounted_met"]
    worse = ml.memory_figures(16 * mib, 10 * mib, 40 * mib, 300 * mib, 20)
    assert not worse["met"] and not worse["accounted_met"]  # nothing accounted: not a pass


def test_ratio_figures_take_medians():
    r = ml.ratio_figures({"batched": [2.0, 9.0, 2.2], "per_candidate": [10.0, 11.0, 30.0]})
    assert r == {"batched_s": 2.2, "per_candidate_s": 11.0, "speedup": 5.0}


def test_metric_reads_a_gauge():
    page = "# HELP x\nmergegate_loaded_bytes 1.7e+07\nmergegate_adapter_cache_bytes 10485760.0\n"
    assert ml.metric(page, "mergegate_loaded_bytes") == 1.7e7
    assert ml.metric(page, "mergegate_adapter_cache_bytes") == 10485760.0
    assert ml.metric(page, "mergegate_adapter_cache_hits") == 0.0
