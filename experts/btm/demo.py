"""The embedded demo repository, grown on this machine while the gateway already serves.

Branch-Train-Merge over shipped domains (stdlib Python code, Python docs, software licences, the KJV):
a seed, one expert per domain, their forest (posterior-weighted ensemble) and its parameter average;
then a small Evo-Merging pool of LoRA adapters on the seed, so a merge session or search can run against
the demo alone. Nothing is downloaded. Run as one background job (`demo.build`): the pipeline and the
pool are resumable, so a restart continues from what exists and a finished demo costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from experts.btm.operations import BTM, ModelSize
from experts.btm.pipeline import run_pipeline
from experts.data.corpora import available_domains
from experts.errors import JobCancelledError
from experts.evo.pool import FULL as POOL_FULL
from experts.evo.pool import QUICK as POOL_QUICK
from experts.evo.pool import build_pool, pool_plan
from experts.training.config import TrainConfig

PREFIX = "demo"
POOL_PREFIX = "demo-pool"
WANTED = ["code", "python_docs", "legal", "scripture"]
FULL = (ModelSize(n_layer=4, n_embd=256, n_head=4, n_positions=256, vocab_size=4096),
        TrainConfig(max_seconds=420, batch_size=8, seq_len=128, lr=2e-3), 2_000_000)
QUICK = (ModelSize(n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=512),
         TrainConfig(max_tokens=8 * 64 * 40, batch_size=8, seq_len=64, lr=3e-3), 200_000)
POOL_SIZE = {False: 8, True: 2}  # adapters in the demo's Evo-Merging pool (full, quick)
PIPELINE_SHARE = 0.7  # of the job's progress bar (the pool takes the rest)

Progress = Callable[[float, str], None]


def demo_domains(quick: bool) -> list[str]:
    have = set(available_domains())
    return [d for d in WANTED if d in have][: 2 if quick else 4]


def demo_plan(quick: bool) -> list[tuple[str, str]]:
    """(expert id, kind) of everything the demo registers, in build order."""
    domains = demo_domains(quick)
    ids = [(f"{PREFIX}-seed", "local")] + [(f"{PREFIX}-{d}", "local") for d in domains]
    ids += [(f"{PREFIX}-forest", "ensemble"), (f"{PREFIX}-average", "local")]
    return ids + [(eid, "lora") for eid, *_ in pool_plan(POOL_SIZE[quick], POOL_PREFIX)]


def build_demo(repo: Any, data_dir: Path, *, quick: bool = False, progress: Progress | None = None,
               should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Build (or finish building) the demo into an open repository; returns the ids it holds."""
    from transformers.utils import logging as hf_logging  # heavy: imported when the demo is built

    hf_logging.disable_progress_bar()
    size, budget, corpus_bytes = QUICK if quick else FULL
    report = progress or (lambda f, m: None)
    result = run_pipeline(BTM(repo, data_dir, corpus_bytes), PREFIX, demo_domains(quick), budget, size=size,
                          progress=lambda f, m: report(PIPELINE_SHARE * f, m), should_stop=should_stop)
    n = POOL_SIZE[quick]
    done = {"adapters": 0}

    def echo(message: str) -> None:
        if should_stop is not None and should_stop():
            raise JobCancelledError("the demo build was cancelled; what it registered is kept and resumed later")
        done["adapters"] += message.startswith("[")
        report(PIPELINE_SHARE + (1 - PIPELINE_SHARE) * done["adapters"] / n, f"[pool] {message}")

    pool = build_pool(repo, n, base=result["seed"], prefix=POOL_PREFIX, config=POOL_QUICK if quick else POOL_FULL,
                      echo=echo)
    report(1.0, "demo ready")
    return {"experts": result["experts"], "forest": result["forest"], "average": result.get("average"),
            "seed": result["seed"], "pool": pool["adapters"], "pool_base": pool["base"]}
