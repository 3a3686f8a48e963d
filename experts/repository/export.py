"""Exporting an expert as a Hugging Face model directory (a tar stream) with a model card stating its lineage.

The tar is written as it is sent (headers, then each file in chunks), so an export holds one chunk in
memory whatever the model's size. Its single top-level directory, named after the expert, loads with
``AutoModelForCausalLM.from_pretrained`` (a LoRA expert's with peft on its base). The README.md model
card names the parents, the recipe and any other lineage (search settings, BTM corpus) from the registry.
"""

from __future__ import annotations

import json
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from experts.errors import ExpertNotFoundError, InvalidExpertError
from experts.hf.validation import model_files
from experts.repository.registry import ExpertRecord
from experts.repository.repo import ExpertRepository

__all__ = ["export_files", "model_card", "tar_stream"]

CHUNK = 1 << 20
Entry = tuple[str, Path | bytes]


def _parent_line(p: dict[str, Any], repo: ExpertRepository) -> str:
    weight = f", weight {p['weight']:g}" if isinstance(p.get("weight"), int | float) else ""
    try:
        r = repo.record(str(p["id"]))
        op = (r.lineage or {}).get("op")
        about = f"{r.kind} expert" + (f", made by `{op}`" if op else "")
    except ExpertNotFoundError:
        about = "no longer registered"
    return f"- `{p['id']}` ({about}{weight})"


def model_card(record: ExpertRecord, repo: ExpertRepository) -> str:
    """README.md for the exported directory: front matter, summary, parents, recipe and the full lineage."""
    lineage = record.lineage or {}
    op = lineage.get("op") or "registered"
    front = {"library_name": "peft" if record.kind == "lora" else "transformers",
             "tags": ["mergegate", *([op] if op != "registered" else []), *record.tags]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {record.id}", "",
             f"Exported from MergeGate on {time.strftime('%Y-%m-%d', time.gmtime())}: a {record.kind} expert "
             f"({record.architecture or 'unknown architecture'}, {record.num_params or '?'} parameters, "
             f"{record.dtype or '?'})" + (f", domain `{record.domain}`" if record.domain else "") + ".", "",
             "## Lineage", "", f"Made by `{op}`."]
    parents = lineage.get("parents") or []
    if parents:
        lines += ["", "Parents:", "", *(_parent_line(p, repo) for p in parents)]
    if lineage.get("base"):
        lines += ["", f"Base model: `{lineage['base']}`."]
    if lineage.get("recipe"):
        lines += ["", "### Recipe", "", "```json", json.dumps(lineage["recipe"], indent=2), "```"]
    rest = {k: v for k, v in lineage.items() if k not in ("op", "parents", "base", "recipe")}
    if rest:  # search settings and results, BTM corpora, import paths...
        lines += ["", "### Details", "", "```yaml", yaml.safe_dump(rest, sort_keys=False).strip(), "```"]
    if not lineage:
        lines += ["", "Registered as is: no recorded parents."]
    return "\n".join(lines) + "\n"


def export_files(repo: ExpertRepository, expert_id: str) -> tuple[str, list[Entry]]:
    """(top-level directory name, [(path in the tar, file or bytes)]) for an expert with weights."""
    record = repo.record(expert_id)
    if record.kind not in ("local", "lora") or not record.path:
        raise InvalidExpertError(f"expert {expert_id!r} is of kind {record.kind!r}: only local and lora experts "
                                 "have weights to export")
    src = repo.artifact_dir(record)
    entries: list[Entry] = [(f"{expert_id}/{f.relative_to(src)}", f) for f in sorted(model_files(src))
                            if f.name != "README.md"]
    entries.append((f"{expert_id}/README.md", model_card(record, repo).encode()))
    return expert_id, entries


def tar_stream(entries: list[Entry], *, chunk: int = CHUNK) -> Iterator[bytes]:
    """A POSIX (pax) tar of ``entries``, yielded header by header and chunk by chunk."""
    now = time.time()
    for name, src in entries:
        info = tarfile.TarInfo(name)
        info.size = len(src) if isinstance(src, bytes) else src.stat().st_size
        info.mtime, info.mode = int(now), 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        if isinstance(src, bytes):
            yield src
        else:
            with src.open("rb") as f:
                while block := f.read(chunk):
                    yield block
        if info.size % tarfile.BLOCKSIZE:
            yield b"\0" * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)
