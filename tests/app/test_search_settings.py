"""One search-settings model: the API schema's fields, the CLI's flags and the algorithms' keywords are
the same set, with the same defaults, all derived from merging.search.settings.SearchSettings."""

from __future__ import annotations

import argparse
import inspect
from dataclasses import fields
from typing import Any

from app import cli_search
from app.protocol.searches import SearchRequest
from merging.search import METHOD_FUNCTIONS
from merging.search.settings import DEFAULTS, METHODS, SearchSettings

SETTINGS = {f.name for f in fields(SearchSettings)}
REQUEST_ONLY = {"provider", "base", "pool", "validation", "loss", "name", "tags", "domain"}
CLI_ONLY = {"help", "url", "api_key_env", "admin_key_env", "base", "pool", "pool_tag", "task", "corpus", "examples",
            "split", "max_examples", "max_tokens_per_example", "timeout", "retries", "name", "tags", "out", "quiet"}
# the evaluator and pool size, callbacks, concurrency, and beta's box (fixed by the merge sessions' range)
NOT_SETTINGS = {"evaluator", "n", "on_trial", "should_stop", "workers", "beta_bound", "bound"}
REQUIRED = ["--url", "http://127.0.0.1:1", "--base", "b", "--pool", "a,b", "--task", "dictionary_word"]


def search_parser() -> argparse.ArgumentParser:
    sub = argparse.ArgumentParser().add_subparsers()
    cli_search.add_parser(sub)
    return sub.choices["search"]


def api_defaults() -> dict[str, Any]:
    props = SearchRequest.model_json_schema()["properties"]
    return {name: p.get("default") for name, p in props.items() if name not in REQUEST_ONLY}


def cli_flags() -> dict[str, list[str]]:
    return {a.dest: a.option_strings for a in search_parser()._actions if a.dest not in CLI_ONLY}


def algorithm_keywords() -> dict[str, dict[str, inspect.Parameter]]:
    """setting name -> {method: the parameter of that method's function}, through the declared renames."""
    out: dict[str, dict[str, inspect.Parameter]] = {}
    for method, function in METHOD_FUNCTIONS.items():
        rename = {f.metadata["keyword"].get(method, f.name): f.name for f in fields(SearchSettings)}
        for p in inspect.signature(function).parameters.values():
            if p.name not in NOT_SETTINGS:
                out.setdefault(rename.get(p.name, p.name), {})[method] = p
    return out


def test_api_fields_cli_flags_and_algorithm_keywords_are_the_same_set():
    assert set(api_defaults()) == SETTINGS
    assert set(cli_flags()) == SETTINGS
    assert set(algorithm_keywords()) == SETTINGS
    assert set(METHOD_FUNCTIONS) == set(METHODS)


def test_every_method_gets_exactly_its_keywords():
    for method in METHODS:
        params = inspect.signature(METHOD_FUNCTIONS[method]).parameters
        tunable = {name for name in params if name not in NOT_SETTINGS}
        assert set(SearchSettings(method=method).arguments()) == tunable, method


def test_the_defaults_are_declared_once():
    for name, default in api_defaults().items():
        value = getattr(DEFAULTS, name)
        assert default == (list(value) if isinstance(value, tuple) else value), name
    for name, by_method in algorithm_keywords().items():
        for method, p in by_method.items():
            if p.default is not inspect.Parameter.empty:
                assert p.default == getattr(DEFAULTS, name), (method, name)
    args = search_parser().parse_args(REQUIRED)
    assert not SETTINGS & set(vars(args))  # omitted flags: the request model's defaults apply
    assert cli_search._request(args).settings() == DEFAULTS


def test_cli_flags_reach_the_settings_by_name():
    flags = ["--method", "task_arithmetic", "--seed", "7", "--budget-stage1", "12", "--no-scale",
             "--lambdas", "0.1,0.5", "--selection", "last_stage", "--early-stop", "3", "--optimizer", "CMA",
             "--early-stop-min-delta", "0.01"]
    settings = cli_search._request(search_parser().parse_args(REQUIRED + flags)).settings()
    assert settings == SearchSettings(method="task_arithmetic", seed=7, budget_stage1=12, scale=False,
                                      lambdas=(0.1, 0.5), selection="last_stage", early_stop=3,
                                      optimizer="CMA", early_stop_min_delta=0.01)
    assert settings.arguments() == {"name": "task_arithmetic", "lambdas": (0.1, 0.5)}
