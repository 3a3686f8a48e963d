"""`mergegate` command line: serve the gateway, build the demo repository and serve it, run BTM operations
(`btm`) or a black-box merge search against a provider (`search`); manage a running gateway's experts and
jobs and merge from mergekit configs (`experts`, `jobs`, `merge`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from app import cli_btm, cli_repo, cli_search
from app.main import create_app
from app.server import serve
from app.settings import Settings, resolve_admin_key
from experts.errors import RegistryMismatchError
from experts.repository.binding import check_binding
from experts.repository.registry import Registry


def _settings(args: argparse.Namespace) -> Settings:
    given = (("host", args.host), ("port", args.port), ("data_dir", args.data_dir))
    overrides: dict[str, object] = {k: v for k, v in given if v is not None}
    if getattr(args, "rebind_registry", False):
        overrides["rebind_registry"] = True
    return Settings(**overrides)


def _preflight(settings: Settings) -> None:
    """Refuse, before anything is written, a registry that is not this data dir's (exit status 2)."""
    registry = Registry(settings.db_url)
    try:
        check_binding(registry, settings.data_dir, rebind=settings.rebind_registry)
    except RegistryMismatchError as e:
        print(f"mergegate: refusing to start: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        registry.close()


def _serve(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)


def _print_howto(settings: Settings, *, demo: bool = False) -> None:
    base = f"http://{settings.host}:{settings.port}"
    key_hint = ("$MERGEGATE_ADMIN_KEY" if settings.admin_key else f"$(cat {settings.admin_key_file})")
    if demo:
        print("The demo experts (Branch-Train-Merge over local corpora, then a small LoRA pool) are built by a "
              "background job\nthe first time (about 12 minutes; listed as 'building' by /v1/models until ready): "
              f"curl {base}/admin/jobs -H \"Authorization: Bearer {key_hint}\"", flush=True)
    print(f"""
MergeGate is starting on {base}  (API docs: {base}/docs)
  curl {base}/v1/models
  curl {base}/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "demo-code", "prompt": "def ", "max_tokens": 32}}'
  python -c "import openai; c = openai.OpenAI(base_url='{base}/v1', api_key='none'); print(c.models.list())"
  admin: curl {base}/admin/experts -H "Authorization: Bearer {key_hint}"
""", flush=True)


def cmd_serve(args: argparse.Namespace) -> None:
    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _preflight(settings)
    resolve_admin_key(settings)
    _print_howto(settings)
    _serve(settings)


def cmd_demo(args: argparse.Namespace) -> None:
    """Serve at once; the demo experts missing from the data dir are built by a background job."""
    settings = _settings(args)
    settings.demo = "quick" if args.quick or settings.demo == "quick" else "full"  # or MERGEGATE_DEMO=quick
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _preflight(settings)
    resolve_admin_key(settings)
    _print_howto(settings, demo=True)
    _serve(settings)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="mergegate", description="MergeGate: a model-merging gateway")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", help="bind address (default 127.0.0.1; env MERGEGATE_HOST)")
        p.add_argument("--port", type=int, help="port (default 8000; env MERGEGATE_PORT)")
        p.add_argument("--data-dir", type=Path, help="data directory (default ./data; env MERGEGATE_DATA_DIR)")
        p.add_argument("--rebind-registry", action="store_true",
                       help="bind the registry to this data dir although their registry ids differ (deletes nothing: "
                            "artifacts without a row go to <data dir>/orphans; env MERGEGATE_REBIND_REGISTRY=1)")

    p = sub.add_parser("serve", help="serve the gateway on an existing data dir")
    common(p)
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("demo", help="serve at once; the demo experts are built locally by a background job if missing")
    common(p)
    p.add_argument("--quick", action="store_true", help="tiny models, a few seconds of training (for tests)")
    p.set_defaults(fn=cmd_demo)
    cli_btm.add_parser(sub)
    cli_search.add_parser(sub)
    cli_repo.add_parsers(sub)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main(sys.argv[1:])
