"""`mergegate experts|jobs|merge`: the repository from the shell, against a running gateway (Ollama-style).

    mergegate experts list                       # a table; --json for machines
    mergegate experts add my-expert /models/my-expert --tags code
    mergegate merge ties.yml --id merged-ties    # a mergekit config; follows the job with a progress bar
    mergegate jobs watch JOB_ID

The gateway is `--url` (env MERGEGATE_URL, default http://127.0.0.1:8000); the admin key is `--key` (env
MERGEGATE_ADMIN_KEY, else the `admin.key` of MERGEGATE_DATA_DIR or ./data). A refusal of the server is
printed as one line (`mergegate: error: ...`) with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")
DEFAULT_URL = "http://127.0.0.1:8000"


class CliError(Exception):
    """One line for the user; exit status 1."""


class Client:
    def __init__(self, url: str, key: str | None, timeout: float = 600.0) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise CliError(f"cannot reach the gateway at {self.url} ({type(e).__name__}): start it with "
                           "`mergegate serve`, or point --url / MERGEGATE_URL at it") from None
        if r.status_code >= 400:
            raise CliError(f"{_message(r)} (HTTP {r.status_code})")
        return r.json()


def _message(r: httpx.Response) -> str:
    try:
        err = r.json().get("error") or {}
        return str(err.get("message") or r.text)
    except (ValueError, AttributeError):
        return r.text.strip() or r.reason_phrase


def _key(args: argparse.Namespace) -> str | None:
    if args.key or os.environ.get("MERGEGATE_ADMIN_KEY"):
        return str(args.key or os.environ["MERGEGATE_ADMIN_KEY"])
    stored = Path(os.environ.get("MERGEGATE_DATA_DIR", "data")) / "admin.key"
    return stored.read_text().strip() if stored.is_file() else None


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    cells = [[h for h, _ in columns]] + [[_cell(r.get(k)) for _, k in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return ",".join(map(str, v)) or "-"
    if isinstance(v, float):
        return f"{v:.0%}" if 0 <= v <= 1 else f"{v:g}"
    return str(v)


def _size(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n:.1f} TB"


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0, time.time() - ts)
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= span:
            return f"{int(s // span)}{unit} ago"
    return f"{int(s)}s ago"


def _out(args: argparse.Namespace, data: Any, human: str) -> None:
    print(json.dumps(data, indent=2) if args.json else human)


# -- experts ---------------------------------------------------------------------------------------------
def experts_list(c: Client, args: argparse.Namespace) -> None:
    data = c.call("GET", "/admin/experts", params={"kind": args.kind} if args.kind else None)["data"]
    rows = [{**e, "size": _size(e.get("size_bytes")), "created": _ago(e.get("created_at")),
             "pin": "yes" if e.get("pinned") else ""} for e in data]
    _out(args, data, _table(rows, [("ID", "id"), ("KIND", "kind"), ("STATUS", "status"), ("SIZE", "size"),
                                   ("TAGS", "tags"), ("PINNED", "pin"), ("CREATED", "created")]))


def experts_show(c: Client, args: argparse.Namespace) -> None:
    e = c.call("GET", f"/admin/experts/{args.id}")
    lines = [f"{k:<14}{_cell(e.get(k))}" for k in ("id", "kind", "status", "architecture", "num_params", "dtype",
                                                   "context_length", "domain", "tags", "pinned", "loaded")]
    lines.append(f"{'size':<14}{_size(e.get('size_bytes'))}")
    lineage = e.get("lineage") or {}
    if lineage:
        parents = ", ".join(f"{p['id']}" + (f" (w={p['weight']:g})" if p.get("weight") is not None else "")
                            for p in lineage.get("parents") or [])
        lines.append(f"{'lineage':<14}{lineage.get('op', '?')}" + (f" of {parents}" if parents else "")
                     + (f" on base {lineage['base']}" if lineage.get("base") else ""))
        if lineage.get("recipe"):
            lines.append(f"{'recipe':<14}{json.dumps(lineage['recipe'])}")
    _out(args, e, "\n".join(lines))


def experts_add(c: Client, args: argparse.Namespace) -> None:
    body = {"id": args.id, "path": str(Path(args.path).resolve()) if args.local_path else args.path,
            "tags": args.tags.split(",") if args.tags else [], "domain": args.domain, "base": args.base}
    e = c.call("POST", "/admin/experts", json={k: v for k, v in body.items() if v is not None})
    _out(args, e, f"added {e['id']} ({e['kind']}, {_size(e.get('size_bytes'))})")


def experts_rm(c: Client, args: argparse.Namespace) -> None:
    out = [c.call("DELETE", f"/admin/experts/{i}") for i in args.ids]
    _out(args, out, "\n".join(f"deleted {d['id']}" for d in out))


def experts_pin(c: Client, args: argparse.Namespace) -> None:
    v = c.call("POST", f"/admin/experts/{args.id}/pin", json={"pinned": not args.off})
    _out(args, v, f"{v['id']}: {'pinned' if v['pinned'] else 'unpinned'} (loaded: {'yes' if v['loaded'] else 'no'})")


def experts_export(c: Client, args: argparse.Namespace) -> None:
    out = Path(args.output or f"{args.id}.tar")
    try:
        with c.http.stream("GET", f"/admin/experts/{args.id}/export") as r:
            if r.status_code >= 400:
                r.read()
                raise CliError(f"{_message(r)} (HTTP {r.status_code})")
            with out.open("wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
    except httpx.TransportError as e:
        raise CliError(f"cannot reach the gateway at {c.url} ({type(e).__name__})") from None
    _out(args, {"id": args.id, "file": str(out), "bytes": out.stat().st_size},
         f"exported {args.id} to {out} ({_size(out.stat().st_size)}): a Hugging Face directory with a model card")


# -- jobs ------------------------------------------------------------------------------------------------
def jobs_list(c: Client, args: argparse.Namespace) -> None:
    params = {k: v for k, v in (("status", args.status), ("kind", args.kind), ("limit", args.limit)) if v}
    data = c.call("GET", "/admin/jobs", params=params)["data"]
    rows = [{**j, "target": (j.get("params") or {}).get("id"), "created": _ago(j.get("created_at"))} for j in data]
    _out(args, data, _table(rows, [("ID", "id"), ("KIND", "kind"), ("TARGET", "target"), ("STATUS", "status"),
                                   ("PROGRESS", "progress"), ("MESSAGE", "message"), ("CREATED", "created")]))


def _bar(job: dict[str, Any], width: int = 30) -> str:
    frac = min(1.0, max(0.0, float(job.get("progress") or 0.0)))
    done = int(frac * width)
    message = (job.get("message") or "")[:60]
    return f"\r{job['status']:<9} [{'#' * done}{'.' * (width - done)}] {frac:4.0%}  {message:<60}"


def watch(c: Client, job_id: str, *, as_json: bool, quiet: bool = False, poll_s: float = 0.5) -> dict[str, Any]:
    """Follow a job until it ends (polling its row), drawing a progress bar on stderr; returns the last row."""
    tty = sys.stderr.isatty()
    last = None
    while True:
        job = c.call("GET", f"/admin/jobs/{job_id}")
        stamp = (job["status"], job.get("progress"), job.get("message"))
        if not quiet and not as_json and stamp != last:
            print(_bar(job) if tty else _bar(job).lstrip("\r").rstrip(), end="" if tty else "\n",
                  file=sys.stderr, flush=True)
        last = stamp
        if job["status"] in TERMINAL:
            if tty and not quiet and not as_json:
                print(file=sys.stderr)
            return dict(job)
        time.sleep(poll_s)


def _ended(args: argparse.Namespace, job: dict[str, Any]) -> None:
    if job["status"] != "succeeded":
        if args.json:
            print(json.dumps(job, indent=2))
        raise CliError(f"job {job['id']} ({job['kind']}) {job['status']}: {job.get('error') or job.get('message')}")
    result = job.get("result") or {}
    _out(args, job, f"job {job['id']} succeeded" + (f": expert {result['expert']}" if "expert" in result else ""))


def jobs_watch(c: Client, args: argparse.Namespace) -> None:
    _ended(args, watch(c, args.job_id, as_json=args.json))


def jobs_cancel(c: Client, args: argparse.Namespace) -> None:
    j = c.call("POST", f"/admin/jobs/{args.job_id}/cancel")
    _out(args, j, f"job {j['id']}: {j['status']}")


# -- merge -----------------------------------------------------------------------------------------------
def merge(c: Client, args: argparse.Namespace) -> None:
    try:
        text = Path(args.config).read_text()
    except OSError as e:
        raise CliError(f"cannot read {args.config}: {e.strerror}") from None
    body = {"id": args.id, "mergekit_config": text, "tags": args.tags.split(",") if args.tags else []}
    job = c.call("POST", "/admin/merges", json=body)
    if args.no_wait:
        _out(args, job, f"merge job {job['id']} queued: follow it with `mergegate jobs watch {job['id']}`")
        return
    _ended(args, watch(c, job["id"], as_json=args.json))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """`experts`, `jobs` and `merge`, each with --url, --key and --json."""
    def client_opts(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--url", default=os.environ.get("MERGEGATE_URL", DEFAULT_URL),
                       help=f"the gateway (env MERGEGATE_URL, default {DEFAULT_URL})")
        p.add_argument("--key", help="admin key (env MERGEGATE_ADMIN_KEY, else MERGEGATE_DATA_DIR/admin.key)")
        p.add_argument("--json", action="store_true", help="print the server's JSON instead of a table")
        return p

    def group(name: str, help_: str) -> argparse._SubParsersAction:
        p = sub.add_parser(name, help=help_, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        return p.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")

    ex = group("experts", "list, show, add, remove, pin or export the gateway's experts")
    p = client_opts(ex.add_parser("list", help="experts as a table"))
    p.add_argument("--kind", help="local | lora | remote | ensemble")
    p.set_defaults(fn=run, client_fn=experts_list)
    p = client_opts(ex.add_parser("show", help="one expert: metadata and lineage"))
    p.add_argument("id")
    p.set_defaults(fn=run, client_fn=experts_show)
    p = client_opts(ex.add_parser("add", help="register a model directory on the gateway's machine"))
    p.add_argument("id")
    p.add_argument("path", help="an absolute directory on the gateway's machine (see --local-path)")
    p.add_argument("--local-path", action="store_true", help="PATH is relative to here (same machine)")
    p.add_argument("--base", help="for a LoRA adapter directory: its registered base expert")
    p.add_argument("--tags", help="comma-separated tags")
    p.add_argument("--domain")
    p.set_defaults(fn=run, client_fn=experts_add)
    p = client_opts(ex.add_parser("rm", help="remove experts and their files"))
    p.add_argument("ids", nargs="+", metavar="ID")
    p.set_defaults(fn=run, client_fn=experts_rm)
    p = client_opts(ex.add_parser("pin", help="keep an expert resident (--off to unpin)"))
    p.add_argument("id")
    p.add_argument("--off", action="store_true")
    p.set_defaults(fn=run, client_fn=experts_pin)

    p = client_opts(ex.add_parser("export", help="download an expert as a Hugging Face directory (tar) with a card"))
    p.add_argument("id")
    p.add_argument("-o", "--output", help="the tar file to write (default ID.tar)")
    p.set_defaults(fn=run, client_fn=experts_export)

    jb = group("jobs", "list, watch or cancel the gateway's jobs")
    p = client_opts(jb.add_parser("list", help="jobs, newest first"))
    p.add_argument("--status")
    p.add_argument("--kind")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(fn=run, client_fn=jobs_list)
    p = client_opts(jb.add_parser("watch", help="follow a job with a progress bar until it ends"))
    p.add_argument("job_id")
    p.set_defaults(fn=run, client_fn=jobs_watch)
    p = client_opts(jb.add_parser("cancel", help="cancel a queued or running job"))
    p.add_argument("job_id")
    p.set_defaults(fn=run, client_fn=jobs_cancel)

    p = client_opts(sub.add_parser("merge", help="merge experts from a mergekit config (YAML)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("config", help="a mergekit config file (models by registered id or server path)")
    p.add_argument("--id", required=True, help="id of the merged expert")
    p.add_argument("--tags", help="comma-separated tags")
    p.add_argument("--no-wait", action="store_true", help="print the job and return at once")
    p.set_defaults(fn=run, client_fn=merge)


def run(args: argparse.Namespace) -> None:
    """Run a client command: exit status 1 with one line on stderr when the gateway refuses."""
    client = Client(args.url, _key(args))
    try:
        args.client_fn(client, args)
    except CliError as e:
        print(f"mergegate: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        client.http.close()
