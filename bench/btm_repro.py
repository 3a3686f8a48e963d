"""Reproduce BTM's comparison at small scale and equal training compute (Li et al. 2022, Table 1-3 style).

Models, all with the same total token budget T:
  (1) dense: one LM trained on a uniform mixture of the train domains for T tokens;
  (2) BTM ensemble: seed on the mixture for T/2, then one expert per domain for T/(2n), served as a
      posterior-weighted ensemble with the cached prior estimated on each evaluation domain's
      validation data (top-k = all, and top-k = 1);
  (3) BTM uniform parameter average of the experts;
  (4) BTM prior-weighted parameter average (prior estimated per evaluation domain);
  (5) an ensemble of experts trained on random splits of the mixture instead of domains.
Reported: test bits per byte (comparable across tokenizers; lower is better) per domain, the
in-domain mean and the out-of-domain mean (domains held out from all training).

    .venv/bin/python bench/btm_repro.py --quick      # a few minutes, tiny models
    .venv/bin/python bench/btm_repro.py              # about 30 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from experts.btm.forest import sample_sequences
from experts.btm.mixture import EnsembleLM, estimate_prior
from experts.btm.operations import BTM, ModelSize
from experts.data.evaluation import evaluate_ids
from experts.runtime import open_repository
from experts.training.config import TrainConfig
from merging.methods import get_method

TRAIN = ["code", "legal", "scripture", "dictionary"]
HELD_OUT = ["jargon", "python_docs"]


def average_model(models: list, weights: list[float]):
    """Parameter average with the merge library's `linear` (normalised weights)."""
    import copy

    linear = get_method("linear")
    out = copy.deepcopy(models[0])
    sds = [m.state_dict() for m in models]
    per = [{"weight": w} for w in weights]
    with torch.no_grad():
        for k, t in out.state_dict().items():
            t.copy_(linear.fn(None, [sd[k] for sd in sds], per, {"normalize": True}, None))
    return out.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, help="total training tokens T per model family")
    ap.add_argument("--eval-tokens", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="2 layers x 128, vocab 2048, T = 300k (about 10 min)")
    args = ap.parse_args()
    if args.small:
        size, T, eval_tokens, corpus_bytes, seq = ModelSize(2, 128, 2, 128, 2048), 300_000, 8192, 1_000_000, 128
    elif args.quick:
        size, T, eval_tokens, corpus_bytes, seq = ModelSize(2, 64, 2, 128, 512), 8 * 64 * 240, 2048, 300_000, 64
    else:
        size, T, eval_tokens, corpus_bytes, seq = ModelSize(4, 256, 4, 256, 4096), 2_400_000, 16384, 2_000_000, 128
    T = args.tokens or T
    eval_tokens = args.eval_tokens or eval_tokens
    t_start = time.time()
    data = Path(tempfile.mkdtemp(prefix="mg-btm-repro-"))
    repo = open_repository(data, database_url=f"sqlite:///{data / 'r.db'}", max_loaded_models=32,
                           max_loaded_bytes=16 << 30)
    btm = BTM(repo, data, corpus_bytes)
    budget = lambda tokens: TrainConfig(max_tokens=int(tokens), batch_size=8, seq_len=seq, lr=2e-3, seed=args.seed)
    n = len(TRAIN)
    log = lambda s: print(f"[{time.time() - t_start:6.0f}s] {s}", flush=True)

    log(f"T = {T:,} tokens per family; model {size}; train {TRAIN}; held out {HELD_OUT}")
    btm.seed("dense", TRAIN, budget(T), size)
    log("dense done")
    btm.seed("seed", TRAIN, budget(T / 2), size)
    log("seed done")
    for i, d in enumerate(TRAIN):
        btm.train(f"x-{d}", "seed", d, budget(T / (2 * n)), seed_offset=i + 1)
    log("domain experts done")
    # Random-split experts: same seed, same budget, trained on random quarters of the mixture.
    from experts.training.lm import save_model_atomic, train_causal_lm

    tok = repo.cache.get("seed").tokenizer
    mix = btm.mixture_ids(tok, TRAIN, "train")
    g = torch.Generator().manual_seed(args.seed)
    blocks = mix[: len(mix) // 1024 * 1024].view(-1, 1024)
    order = torch.randperm(blocks.shape[0], generator=g)
    rand_models = []
    for i in range(n):
        part = blocks[order[i::n]].reshape(-1)
        model, _ = btm._fresh_model("seed")
        config = budget(T / (2 * n))
        train_causal_lm(model, part, None, replace(config, seed=config.seed + 100 + i))
        rand_models.append(model.eval())
    log("random-split experts done")
    del save_model_atomic

    load = lambda i: repo.cache.get(i).model
    experts = [load(f"x-{d}") for d in TRAIN]
    uniform_avg = average_model(experts, [1 / n] * n)
    rows: dict[str, dict[str, float]] = {}
    for d in TRAIN + HELD_OUT:
        test = btm.token_ids(tok, d, "test")[:eval_tokens]
        n_bytes = len(tok.decode(test[1:].tolist()).encode())
        val = btm.token_ids(tok, d, "validation")
        seqs = sample_sequences(val, 8, seq)
        prior = estimate_prior(experts, seqs, decay=0.3)
        rprior = estimate_prior(rand_models, seqs, decay=0.3)
        models = {
            "dense": load("dense"),
            "BTM ensemble (top-k = all)": EnsembleLM(experts, prior),
            "BTM ensemble (top-k = 1)": EnsembleLM(experts, prior, top_k=1),
            "BTM uniform average": uniform_avg,
            "BTM prior-weighted average": average_model(experts, prior.tolist()),
            "random-split ensemble": EnsembleLM(rand_models, rprior),
            "seed (T/2)": load("seed"),
        }
        for name, m in models.items():
            r = evaluate_ids(m, test, n_bytes, context_length=seq, stride=seq // 2)
            rows.setdefault(name, {})[d] = r.bits_per_byte
        log(f"evaluated {d}")
    cols = TRAIN + HELD_OUT
    print(f"\nTest bits per byte (lower is better); T = {T:,} tokens per family, seed {args.seed}, "
          f"{'quick' if args.quick else 'small' if args.small else 'full'} mode, {time.time() - t_start:.0f}s\n")
    print("| model | " + " | ".join(cols) + " | in-domain mean | out-of-domain mean |")
    print("|---" * (len(cols) + 3) + "|")
    for name, r in rows.items():
        idm = sum(r[d] for d in TRAIN) / len(TRAIN)
        oodm = sum(r[d] for d in HELD_OUT) / len(HELD_OUT)
        print(f"| {name} | " + " | ".join(f"{r[d]:.3f}" for d in cols) + f" | {idm:.3f} | {oodm:.3f} |")
    repo.close()


if __name__ == "__main__":
    main()
