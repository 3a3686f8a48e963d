"""The embedded demo repository: a locally trained tokenizer and small GPT-2 experts, one per domain.

Everything is built on this machine from text that ships with Python (stdlib sources, pydoc
topics); nothing is downloaded. Building is idempotent: experts already in the registry are kept,
so later starts are instant. The Branch-Train-Merge pipeline (issue 4) replaces the training step
here; the seam is `build_demo`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from experts.corpora import build_corpus, load_split
from experts.registry import Registry
from experts.repository import ExpertRepository
from experts.store import ArtifactStore

log = logging.getLogger("mergegate.demo")


@dataclass(frozen=True)
class DemoSize:
    corpus_bytes: int
    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    train_seconds: float


FULL = DemoSize(corpus_bytes=1_000_000, vocab_size=4096, n_layer=4, n_embd=128, n_head=4, n_positions=256,
                train_seconds=25.0)
QUICK = DemoSize(corpus_bytes=150_000, vocab_size=512, n_layer=2, n_embd=64, n_head=2, n_positions=128,
                 train_seconds=3.0)
DEMO_EXPERTS = {"demo-code": "code", "demo-docs": "python_docs"}  # expert id -> domain


def _bar(fraction: float, width: int = 30) -> str:
    done = int(round(fraction * width))
    return "[" + "#" * done + "." * (width - done) + f"] {fraction * 100:5.1f}%"


def build_demo(data_dir: Path, *, db_url: str, quick: bool = False,
               echo: Callable[[str], None] = lambda s: print(s, flush=True)) -> list[str]:
    """Build and register the demo experts that are missing; returns the ids built."""
    from experts.tokenizer import train_bpe_tokenizer
    from experts.training import TrainConfig, new_gpt2, save_model_atomic, tokenize_text, train_causal_lm

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    size = QUICK if quick else FULL
    data_dir.mkdir(parents=True, exist_ok=True)
    repo = ExpertRepository(Registry(db_url), ArtifactStore(data_dir), max_loaded_models=1, max_loaded_bytes=1 << 30)
    repo.open()
    try:
        missing = {e: d for e, d in DEMO_EXPERTS.items() if not repo.registry.has_expert(e)}
        if not missing:
            return []
        echo(f"Building the demo repository in {data_dir} ({'quick' if quick else 'about a minute'}; once only)")
        corpora = data_dir / "corpora"
        texts = {d: load_split(corpora, build_corpus(d, corpora, size.corpus_bytes).name, "train")
                 for d in DEMO_EXPERTS.values()}
        t0 = time.perf_counter()
        tok = train_bpe_tokenizer(list(texts.values()), vocab_size=size.vocab_size)
        echo(f"  tokenizer: byte-level BPE, {len(tok)} tokens ({time.perf_counter() - t0:.1f}s)")
        for expert_id, domain in missing.items():
            model = new_gpt2(len(tok), n_layer=size.n_layer, n_embd=size.n_embd, n_head=size.n_head,
                             n_positions=size.n_positions, bos_token_id=tok.eos_token_id,
                             eos_token_id=tok.eos_token_id, seed=0)
            train_ids = tokenize_text(tok, texts[domain])
            val_ids = tokenize_text(tok, load_split(corpora, domain, "validation"))
            cfg = TrainConfig(max_seconds=size.train_seconds, seq_len=min(128, size.n_positions), eval_every=100,
                              eval_tokens=8192, seed=0)

            def show(p, expert_id=expert_id) -> None:  # noqa: ANN001
                val = f" val {p.val_loss:.2f}" if p.val_loss is not None else ""
                echo(f"  {expert_id:10s} {_bar(p.fraction)} loss {p.train_loss:.2f}{val} {p.tokens_per_s:,.0f} tok/s")

            result = train_causal_lm(model, train_ids, val_ids, cfg, on_progress=show)
            staging = repo.store.new_staging()
            save_model_atomic(model, tok, staging)
            lineage = {"parents": [], "recipe": {"op": "train", "corpus": domain, "tokens": result.tokens,
                                                 "seconds": round(result.elapsed_s, 1), "seed": 0,
                                                 "val_loss": result.final_val_loss}}
            repo.register_staged(expert_id, staging, domain=domain, tags=["demo", domain], lineage=lineage)
            echo(f"  {expert_id}: registered (validation loss {result.final_val_loss:.3f})")
        return list(missing)
    finally:
        repo.close()
