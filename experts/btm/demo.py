"""The embedded demo repository, grown by the Branch-Train-Merge pipeline on this machine.

seed -> branch -> train -> merge over shipped domains (stdlib Python code, Python docs, software
licences, the KJV), then a forest (posterior-weighted ensemble) and its parameter average.
Nothing is downloaded. Idempotent: once the forest exists, later starts are instant.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from experts.btm.operations import BTM, ModelSize
from experts.btm.pipeline import run_pipeline
from experts.data.corpora import available_domains
from experts.runtime import open_repository
from experts.training.config import TrainConfig

PREFIX = "demo"
WANTED = ["code", "python_docs", "legal", "scripture"]
FULL = (ModelSize(n_layer=4, n_embd=256, n_head=4, n_positions=256, vocab_size=4096),
        TrainConfig(max_seconds=420, batch_size=8, seq_len=128, lr=2e-3), 2_000_000)
QUICK = (ModelSize(n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=512),
         TrainConfig(max_tokens=8 * 64 * 40, batch_size=8, seq_len=64, lr=3e-3), 200_000)


def _bar(fraction: float, width: int = 30) -> str:
    done = int(round(fraction * width))
    return "[" + "#" * done + "." * (width - done) + f"] {fraction * 100:5.1f}%"


def build_demo(data_dir: Path, *, db_url: str, quick: bool = False,
               echo: Callable[[str], None] | None = None, rebind: bool = False) -> dict | None:
    """Build the demo forest if it is missing; returns the pipeline's result (None when already built)."""
    from transformers.utils import logging as hf_logging  # heavy: imported when the demo is built

    hf_logging.disable_progress_bar()
    size, budget, corpus_bytes = QUICK if quick else FULL
    data_dir.mkdir(parents=True, exist_ok=True)
    repo = open_repository(data_dir, database_url=db_url, max_loaded_models=8,
                           max_loaded_bytes=4 << 30, rebind=rebind)
    try:
        if repo.registry.has_expert(f"{PREFIX}-forest"):
            return None
        for stale in [r.id for r in repo.list() if r.id.startswith(f"{PREFIX}-")][::-1]:
            repo.delete(stale)  # an interrupted earlier build: start over
        have = set(available_domains())
        domains = [d for d in WANTED if d in have][: 2 if quick else 4]
        interactive = sys.stdout.isatty()
        say = echo or (lambda s: print(s, flush=True))
        say(f"Building the demo repository in {data_dir}: Branch-Train-Merge over {', '.join(domains)} "
            f"({'quick' if quick else 'about 8 minutes'}; once only)")
        last = {"t": 0.0}

        def progress(f: float, msg: str) -> None:
            now = time.monotonic()
            if now - last["t"] >= (0.5 if interactive else 5.0) or f >= 1.0:
                last["t"] = now
                line = f"  {_bar(f)} {msg[:90]}"
                (print("\r" + line.ljust(130), end="", flush=True) if interactive and echo is None else say(line))

        result = run_pipeline(BTM(repo, data_dir, corpus_bytes), PREFIX, domains, budget, size=size,
                              progress=progress)
        if interactive and echo is None:
            print()
        say(f"Demo ready: experts {', '.join(result['experts'])}; ensemble {result['forest']}; "
            f"average {result.get('average')}")
        return result
    finally:
        repo.close()
