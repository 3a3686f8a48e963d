"""`mergegate search ...`: an Evo-Merging (or LoraHub) search against a merge-session provider by URL.

The client side only: coefficients go out, losses come back, no weights are held here. Arguments are
checked by the same model as `POST /admin/searches`. Progress goes to stderr, the result (JSON) to
stdout or `--out`. With `--name` the provider registers the winner (its `materialize`).

    MERGEGATE_PROVIDER_KEY=... mergegate search --url http://127.0.0.1:8000 --base pool-base \\
        --pool-tag pool --task dictionary_word --seed 42 --name evo-dictionary-word
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Literal, get_args, get_origin, get_type_hints

from pydantic import ValidationError

from app.protocol.searches import SearchRequest
from app.redaction import install_redaction
from experts.evo.http import EvaluationError
from experts.evo.search_job import HttpProvider, Progress, SearchSpec, run_search
from merging.search.settings import SearchSettings


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The `search` subcommand: where to search, on what data, and one flag per search setting."""
    p = sub.add_parser("search", help="run an Evo-Merging search against a merge-session provider (URL)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the provider's root URL (without /v1)")
    p.add_argument("--api-key-env", default="MERGEGATE_PROVIDER_KEY",
                   help="environment variable holding the provider's client key (default MERGEGATE_PROVIDER_KEY)")
    p.add_argument("--admin-key-env", default="MERGEGATE_PROVIDER_ADMIN_KEY",
                   help="environment variable holding the provider's admin key, needed with --name (materialising "
                        "is an admin right; default MERGEGATE_PROVIDER_ADMIN_KEY, else the client key is tried)")
    p.add_argument("--base", required=True, help="the base expert on the provider")
    pool = p.add_mutually_exclusive_group(required=True)
    pool.add_argument("--pool", help="comma-separated adapter ids, in order")
    pool.add_argument("--pool-tag", action="append", help="select every adapter on the base with this tag")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--task", help="a task made from the provider's corpora, e.g. dictionary_word")
    data.add_argument("--corpus", help="a corpus registered on the provider")
    data.add_argument("--examples", type=Path, help="a JSONL file of {prompt, completion} or {text} lines")
    p.add_argument("--split", default="validation", choices=["train", "validation", "test"])
    p.add_argument("--max-examples", type=int)
    p.add_argument("--max-tokens-per-example", type=int, default=128)
    settings = p.add_argument_group("search settings (as POST /admin/searches; omitted: its defaults)")
    for f in fields(SearchSettings):
        _add_setting_flag(settings, f)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP exchange")
    p.add_argument("--retries", type=int, default=4)
    p.add_argument("--name", help="register the winner on the provider under this id")
    p.add_argument("--tags", default="", help="comma-separated tags of the registered winner")
    p.add_argument("--out", type=Path, help="write the result JSON here (default: stdout)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(fn=cmd_search)


def _add_setting_flag(p: Any, f: Any) -> None:
    """The flag of one SearchSettings field: --budget-stage1 N, --no-denoise, --lambdas 0.1,0.5, ...

    Its default is not set here (argparse.SUPPRESS): an omitted flag takes the request model's default,
    that is SearchSettings'."""
    flag, hint = f.name.replace("_", "-"), get_type_hints(SearchSettings)[f.name]
    text = f"{f.metadata['help']} (default: {_shown(f.default)})"
    if hint is bool:
        name, action = (f"--no-{flag}", "store_false") if f.default else (f"--{flag}", "store_true")
        text = f"{f.name} = {not f.default}: {f.metadata['help']}"
        p.add_argument(name, dest=f.name, action=action, default=argparse.SUPPRESS, help=text)
        return
    if get_origin(hint) is Literal:
        kind: dict[str, Any] = {"choices": list(get_args(hint))}
    elif get_origin(hint) is tuple:  # tuple[float, ...]
        kind = {"type": _floats, "metavar": "X,Y,..."}
    elif isinstance(hint, UnionType):  # X | None
        kind = {"type": next(a for a in get_args(hint) if a is not NoneType)}
    else:
        kind = {"type": hint}
    p.add_argument(f"--{flag}", dest=f.name, default=argparse.SUPPRESS, help=text, **kind)


def _floats(text: str) -> tuple[float, ...]:
    """Comma-separated numbers."""
    return tuple(float(x) for x in text.split(","))


def _shown(value: Any) -> str:
    """A default as the flag would take it (tuples comma-separated)."""
    return ",".join(str(x) for x in value) if isinstance(value, tuple) else str(value)


def _request(args: argparse.Namespace) -> SearchRequest:
    """The request body from the flags, validated by the API's own model (ValidationError when bad)."""
    if args.examples is not None:
        lines = args.examples.read_text(encoding="utf-8").splitlines()
        validation: dict[str, Any] = {"examples": [json.loads(x) for x in lines if x.strip()]}
    else:
        validation = {"task": args.task} if args.task else {"corpus": args.corpus}
        validation["split"] = args.split
    if args.max_examples is not None:
        validation["max_examples"] = args.max_examples
    body = {"provider": {"url": args.url, "timeout_s": args.timeout, "retries": args.retries},
            "base": args.base, "pool": args.pool.split(",") if args.pool else {"tags": args.pool_tag},
            "validation": validation, "loss": {"max_tokens_per_example": args.max_tokens_per_example},
            "name": args.name, "tags": [t for t in args.tags.split(",") if t]}
    body.update({f.name: getattr(args, f.name) for f in fields(SearchSettings) if hasattr(args, f.name)})
    return SearchRequest.model_validate(body)


def cmd_search(args: argparse.Namespace) -> None:
    """Run the search, print progress to stderr and the result JSON to stdout (or --out)."""
    try:
        req = _request(args)
    except (ValidationError, ValueError, OSError) as e:
        sys.exit(f"mergegate search: {e}")
    key = os.environ.get(args.api_key_env) or None
    admin_key = os.environ.get(args.admin_key_env) or None
    install_redaction(key, admin_key)  # the provider's keys: in no message and no log line
    provider = HttpProvider(str(req.provider.url), key, admin_key=admin_key,
                            timeout=req.provider.timeout_s, retries=req.provider.retries)
    spec = SearchSpec(session=req.model_dump(include={"base", "pool", "validation", "loss"}, exclude_none=True),
                      settings=req.settings())
    shown = [0.0]

    def report(p: Progress, force: bool) -> None:
        now = time.monotonic()
        if not args.quiet and (force or now - shown[0] >= 2.0 or p.queries == p.total):
            shown[0] = now
            print(p.message(), file=sys.stderr, flush=True)

    try:
        result, view = run_search(provider, spec, on_progress=report)
        try:
            out: dict[str, Any] = {"search": {**result.to_dict(), "provider": provider.url,
                                              "session": {"id": view.get("id"), "experts": view.get("experts")}}}
            out["search"].pop("history")
            if req.name:
                made = provider.materialize(str(view["id"]), result.alpha, result.beta, req.name, tags=req.tags,
                                            domain=req.domain)
                out["expert"] = made.get("id", req.name)
        finally:
            provider.close(str(view.get("id")))
    except EvaluationError as e:
        sys.exit(f"mergegate search: {e}")
    text = json.dumps(out, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    else:
        print(text)
