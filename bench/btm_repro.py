"""Reproduce BTM's comparison (Li et al. 2022) at a fixed small model size and equal training compute.

Protocol (shared/specs/btm.md §1.2-1.4, §2.3, §4; experts/btm/protocol.py): the dense model takes N
updates at batch B on a domain-balanced mixture of the n training domains; the seed is that run stopped at
S = N/2; every BTM expert resumes the seed (weights, AdamW state, schedule position) and takes N - S updates
at batch B/n on its domain; the random-split baseline does the same on n random shards of the mixture. So
dense, BTM and random-split each use T = N x B x L training tokens (seed + experts).

Evaluated on each domain's full test split (>= 100k tokens, non-overlapping blocks of L tokens, every token
after the first scored once, spec §4), in-domain (the n training domains) and out-of-domain (the held-out
domains, never trained on): dense, the BTM ensemble (cached prior from 100 dev sequences, EMA 0.3; paper
posterior, plus the reference code's one-step posterior and top-1 by prior), the uniform and the
posterior(prior)-weighted parameter average, the random-split ensemble and its uniform average, and the seed.

Resumable: every finished cell (n, T, seed) writes its JSON under OUT/results/ and is skipped when run
again; inside a cell, trained models are kept on disk until the cell's results are written.

    nice -n 19 .venv/bin/python bench/btm_repro.py --out /work/runs/btm            # the committed grid
    .venv/bin/python bench/btm_repro.py --out /tmp/btm-quick --quick                # a smoke run, minutes
    .venv/bin/python bench/btm_repro.py --out /work/runs/btm --summary docs/data/btm_repro
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.btm_repro_report import summarize
from experts.btm.mixture.posterior import sequence_log_posteriors, top_k_experts
from experts.btm.protocol import dev_sequences, plan_budget, prior_from_logliks
from experts.data.corpora import build_corpus, extract_documents, load_split
from experts.data.tokens import tokenize_text
from experts.hf.tokenizer import train_bpe_tokenizer
from experts.training.config import TrainConfig
from experts.training.lm import new_gpt2, train_causal_lm

TRAIN8 = ["code", "python_docs", "legal", "scripture", "dictionary", "jargon", "math_docs", "unicode"]
TRAIN4 = ["code", "legal", "scripture", "dictionary"]
HELD_OUT = ["numpy_docs", "decimal_tests"]
MIN_TEST_TOKENS = 100_000


def log(out: Path, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(out / "progress.log", "a") as f:
        f.write(line + "\n")


# -- data -------------------------------------------------------------------------------------------------
def prepare(out: Path, a: argparse.Namespace) -> tuple[Any, dict[str, dict[str, torch.Tensor]]]:
    """Corpora (test split large enough for >= 100k tokens), one BPE on the 8 training domains, token streams."""
    corpora, tokdir = out / "corpora", out / "tokenizer"
    domains = TRAIN8 + HELD_OUT
    from transformers import AutoTokenizer

    if (out / "streams.pt").is_file():
        return AutoTokenizer.from_pretrained(tokdir), torch.load(out / "streams.pt", weights_only=True)
    budgets = {d: min(sum(len(t.encode()) + 2 for _, t in extract_documents(d)), a.corpus_bytes) for d in domains}
    shares = {d: (min(0.2, max(0.02, a.dev_bytes / b)), min(0.45, max(0.05, 450_000 / b)))
              for d, b in budgets.items()}
    for d in domains:  # pass 1: generous test splits, to train the tokenizer and measure bytes per token
        build_corpus(d, corpora, budgets[d], validation_share=shares[d][0], test_share=shares[d][1])
    if not (tokdir / "tokenizer.json").is_file():
        texts = [load_split(corpora, d, "train") for d in TRAIN8]
        train_bpe_tokenizer(texts, vocab_size=a.vocab).save_pretrained(tokdir)
    tok = AutoTokenizer.from_pretrained(tokdir)
    for d in domains:  # pass 2: test splits of about --test-tokens tokens (whole documents, so a bit more)
        text = load_split(corpora, d, "test")
        per_token = len(text.encode()) / max(1, int(tokenize_text(tok, text).numel()))
        test = min(0.45, a.test_tokens * per_token / budgets[d])
        build_corpus(d, corpora, budgets[d], validation_share=shares[d][0], test_share=test)
    streams: dict[str, dict[str, torch.Tensor]] = {}
    for d in domains:
        streams[d] = {s: tokenize_text(tok, load_split(corpora, d, s)) for s in ("train", "validation", "test")}
        streams[d]["test_bytes"] = torch.tensor(len(load_split(corpora, d, "test").encode()))
        log(out, f"{d}: " + ", ".join(f"{s} {int(streams[d][s].numel()):,} tokens"
                                      for s in ("train", "validation", "test")))
    torch.save(streams, out / "streams.pt")
    return tok, streams


def mixture(streams: list[torch.Tensor], block: int = 4096) -> torch.Tensor:
    """Domain-balanced mixture (spec §1.1): the same number of tokens from every domain, interleaved."""
    n = min(int(s.numel()) for s in streams)
    parts = []
    for start in range(0, n, block):
        parts.extend(s[start:min(start + block, n)] for s in streams)
    return torch.cat(parts)


def random_shards(mix: torch.Tensor, n: int, seed: int, block: int = 1024) -> list[torch.Tensor]:
    """n random shards of the mixture (blocks of `block` tokens assigned at random): the paper's random split."""
    blocks = mix[: mix.numel() // block * block].view(-1, block)
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))
    return [blocks[order[i::n]].reshape(-1) for i in range(n)]


# -- scoring ----------------------------------------------------------------------------------------------
def token_logprobs(model: Any, ids: torch.Tensor, length: int, batch: int = 8) -> torch.Tensor:
    """log p(x_t | block prefix) for every token after the first, in non-overlapping blocks (spec §4): [nb, L]."""
    nb = (int(ids.numel()) - 1) // length
    x, y = ids[: nb * length].view(nb, length), ids[1: nb * length + 1].view(nb, length)
    out = torch.empty(nb, length)
    with torch.inference_mode():
        for b in range(0, nb, batch):
            logits = model(input_ids=x[b:b + batch]).logits.float()
            out[b:b + batch] = -F.cross_entropy(logits.transpose(1, 2), y[b:b + batch], reduction="none")
    return out


def mixture_nll(lps: torch.Tensor, prior: torch.Tensor, mode: str) -> float:
    """Mean NLL (nats/token) of the posterior-weighted ensemble (spec §2.1 paper / §2.2 reference)."""
    lp = lps.permute(1, 2, 0).double()  # [nb, L, k]
    logw = sequence_log_posteriors(torch.log(prior.double()), lp, mode)
    return float(-torch.logsumexp(logw + lp, dim=-1).mean())


def reference_prior(dev_lps: torch.Tensor, decay: float = 0.3) -> torch.Tensor:
    """Spec §2.3 [CODE]: EMA of the one-step weights at each dev sequence's last position, running prior."""
    k = dev_lps.shape[0]
    prior = None
    for s in range(dev_lps.shape[1]):
        current = prior if prior is not None else torch.full((k,), 1.0 / k, dtype=torch.float64)
        w = sequence_log_posteriors(torch.log(current), dev_lps[:, s].T.double(), "reference")[-1].exp()
        prior = w if prior is None else (1 - decay) * prior + decay * w
    assert prior is not None
    return prior


def average_state(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """θ = Σ w_j θ_j over floating tensors, integer buffers from the first (spec §2.5)."""
    total = sum(weights)
    return {k: (sum(w / total * s[k].float() for w, s in zip(weights, states, strict=True))
                if v.is_floating_point() else v) for k, v in states[0].items()}


# -- one cell ---------------------------------------------------------------------------------------------
def run_cell(out: Path, a: argparse.Namespace, tok: Any, streams: dict, n: int, T: int, seed: int) -> dict:
    domains = TRAIN8[:n] if n == 8 else TRAIN4 if n == 4 else TRAIN8[:n]
    evals = domains + HELD_OUT  # out-of-domain: the held-out domains, the same for every n
    cell = out / "cells" / f"n{n}_T{T}_s{seed}"
    cell.mkdir(parents=True, exist_ok=True)
    budget = TrainConfig(max_tokens=T, batch_size=a.batch, seq_len=a.seq_len, lr=a.lr, min_lr_ratio=0.0,
                         warmup_steps=0, seed=seed, bf16=True)
    plan0 = plan_budget(budget, n)
    assert plan0.total_steps is not None
    warm = max(1, round(0.08 * plan0.total_steps))  # spec §1.4: warm-up 8% of the updates
    plan = plan_budget(TrainConfig(**{**budget.__dict__, "warmup_steps": warm}), n)
    size = dict(n_layer=a.layers, n_embd=a.embd, n_head=a.heads, n_positions=a.seq_len)
    t0 = time.time()
    timings: dict[str, float] = {}

    def fresh() -> Any:
        return new_gpt2(len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, seed=seed, **size)

    def stage(name: str, init: str | None, data: torch.Tensor, config: TrainConfig, keep_opt: bool = False) -> None:
        path = cell / f"{name}.pt"
        if path.is_file():
            return
        ts = time.time()
        model = fresh()
        opt = None
        if init is not None:
            ck = torch.load(cell / f"{init}.pt", weights_only=True)
            model.load_state_dict(ck["model"])
            opt = ck["optimizer"]
        r = train_causal_lm(model, data, None, config, optimizer_state=opt)
        ck = {"model": model.state_dict(), "steps": r.steps, "tokens": r.tokens}
        if keep_opt:
            ck["optimizer"] = r.optimizer_state
        torch.save(ck, cell / f".{name}.tmp")
        os.replace(cell / f".{name}.tmp", path)
        timings[name] = round(time.time() - ts, 1)
        log(out, f"  n={n} T={T:,} seed={seed}: {name} {r.steps} updates x {config.batch_size} "
                 f"({r.tokens:,} tokens) in {timings[name]:.0f}s, train loss {r.final_train_loss:.3f}")

    mix = mixture([streams[d]["train"] for d in domains])
    stage("seed", None, mix, plan.seed, keep_opt=True)
    stage("dense", "seed", mix, plan.dense_rest)
    for i, d in enumerate(domains):
        stage(f"expert_{d}", "seed", streams[d]["train"],
              TrainConfig(**{**plan.expert.__dict__, "seed": seed * 1000 + i + 1}))
    for i, shard in enumerate(random_shards(mix, n, seed)):
        stage(f"random_{i}", "seed", shard, TrainConfig(**{**plan.expert.__dict__, "seed": seed * 1000 + 500 + i}))

    # scoring: every model on every evaluation domain's full test split (+ experts on 100 dev sequences)
    ts = time.time()
    L = a.seq_len
    model = fresh().eval()
    score_cache = cell / "scores.pt"
    scores: dict[str, Any] = torch.load(score_cache, weights_only=True) if score_cache.is_file() else {}
    names = ["dense"] + [f"expert_{d}" for d in domains] + [f"random_{i}" for i in range(n)]
    states = {m: torch.load(cell / f"{m}.pt", weights_only=True)["model"] for m in names}
    for m in names:
        if m in scores:
            continue
        model.load_state_dict(states[m])
        entry = {}
        for d in evals:
            entry[d] = {"test": token_logprobs(model, streams[d]["test"], L)}
            if m.startswith(("expert_", "random_")):
                dev = dev_sequences(streams[d]["validation"], a.dev_sequences, L + 1)
                entry[d]["dev"] = _dev_lps(model, dev)
        scores[m] = entry
        torch.save(scores, score_cache)
    log(out, f"  n={n} T={T:,} seed={seed}: scored {len(names)} models on {len(evals)} domains "
             f"in {time.time() - ts:.0f}s")
    res = _combine(a, scores, states, model, streams, domains, evals, L)
    timings["scoring"] = round(time.time() - ts, 1)
    return {"n": n, "T": T, "seed": seed, "train_domains": domains, "eval_domains": evals,
            "held_out": [d for d in evals if d not in domains],
            "plan": {"total_steps": plan.total_steps, "seed_steps": plan.seed_steps, "dense_batch": a.batch,
                     "expert_batch": plan.expert.batch_size, "expert_updates": plan.expert.max_tokens
                     // (plan.expert.batch_size * L), "seq_len": L, "warmup_steps": warm, "lr": a.lr},
            "model": {**size, "vocab_size": len(tok), "params": sum(p.numel() for p in model.parameters())},
            "test_tokens": {d: int(streams[d]["test"].numel()) for d in evals},
            "seconds": round(time.time() - t0, 1), "timings": timings, **res}


def _dev_lps(model: Any, dev: list[list[int]]) -> torch.Tensor:
    """Log-probs of every token after the first of each dev sequence: [N, len - 1]."""
    x = torch.tensor(dev)
    with torch.inference_mode():
        logits = model(input_ids=x[:, :-1]).logits.float()
    return -F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")


def _combine(a: argparse.Namespace, scores: dict, states: dict, model: Any, streams: dict, domains: list[str],
             evals: list[str], L: int) -> dict[str, Any]:
    """Per-domain NLL of every method; the averaged models are built and scored here."""
    experts = [f"expert_{d}" for d in domains]
    randoms = [k for k in scores if k.startswith("random_")]
    nll: dict[str, dict[str, float]] = {}
    priors: dict[str, dict[str, list[float]]] = {}

    def put(method: str, d: str, value: float) -> None:
        nll.setdefault(method, {})[d] = value

    uniform = average_state([states[m] for m in experts], [1.0] * len(experts))
    r_uniform = average_state([states[m] for m in randoms], [1.0] * len(randoms))
    for d in evals:
        put("dense", d, float(-scores["dense"][d]["test"].mean()))
        for family, members in (("btm", experts), ("random", randoms)):
            test = torch.stack([scores[m][d]["test"] for m in members])
            dev = torch.stack([scores[m][d]["dev"] for m in members])  # [k, N, L]
            prior = prior_from_logliks(dev.sum(-1).T)
            rprior = reference_prior(dev)
            priors.setdefault(family, {})[d] = [round(float(p), 6) for p in prior]
            put(f"{family}_ensemble", d, mixture_nll(test, prior, "paper"))
            put(f"{family}_ensemble_reference", d, mixture_nll(test, rprior, "reference"))
            if family == "btm":
                put("btm_ensemble_top1", d, mixture_nll(test, top_k_experts(prior, 1).prior, "paper"))
                put("btm_ensemble_uniform_prior", d, mixture_nll(test, torch.full_like(prior, 1 / len(members)),
                                                                 "paper"))
                model.load_state_dict(average_state([states[m] for m in members], prior.tolist()))
                put("btm_posterior_average", d, float(-token_logprobs(model, streams[d]["test"], L).mean()))
        model.load_state_dict(uniform)
        put("btm_uniform_average", d, float(-token_logprobs(model, streams[d]["test"], L).mean()))
        model.load_state_dict(r_uniform)
        put("random_uniform_average", d, float(-token_logprobs(model, streams[d]["test"], L).mean()))
    scored = {d: int(scores["dense"][d]["test"].numel()) for d in evals}
    bpb = {m: {d: v * scored[d] / math.log(2) / int(streams[d]["test_bytes"]) for d, v in r.items()}
           for m, r in nll.items()}
    return {"nll": nll, "bits_per_byte": bpb, "scored_tokens": scored, "priors": priors}


def order_cells(ns: list[int], Ts: list[int], seeds: list[int]) -> list[tuple[int, int, int]]:
    """First seed: every (n, T); then the other seeds, the largest n first: spreads accumulate early."""
    first = [(n, T, seeds[0]) for n in ns for T in Ts]
    rest = [(n, T, s) for n in ns for s in seeds[1:] for T in Ts]
    return first + rest


def claim(lock: Path) -> bool:
    """Take a cell for this process (several workers may share OUT); a dead worker's lock is taken over."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or 0), 0)
            return False
        except (ProcessLookupError, ValueError):
            lock.write_text(str(os.getpid()))
            return True
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="run directory (resumable state and results)")
    ap.add_argument("--n", default="8,4", help="numbers of training domains")
    ap.add_argument("--T", default="500000,1000000,2000000", help="total training tokens per family")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--embd", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="dense batch (sequences); experts get batch / n")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dev-sequences", type=int, default=100)
    ap.add_argument("--corpus-bytes", type=int, default=4_000_000)
    ap.add_argument("--test-tokens", type=int, default=108_000, help="target size of each test split")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is much faster on a loaded CPU)")
    ap.add_argument("--dev-bytes", type=int, default=80_000)
    ap.add_argument("--keep", action="store_true", help="keep a finished cell's models and scores")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny T, one seed, n = 4")
    ap.add_argument("--summary", type=Path, help="only write the summary (JSON + markdown) of OUT to this folder")
    a = ap.parse_args()
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    if a.summary:
        summarize(out / "results", a.summary)
        return
    if a.quick:
        a.n, a.T, a.seeds, a.test_tokens = "4", "60000", "0", 6000
    torch.manual_seed(0)
    tok, streams = prepare(out, a)
    short = [d for d in TRAIN8 + HELD_OUT if streams[d]["test"].numel() < MIN_TEST_TOKENS]
    if short and not a.quick:
        raise SystemExit(f"test splits under {MIN_TEST_TOKENS:,} tokens: {short}; raise --test-tokens")
    torch.set_num_threads(a.threads)
    cells = order_cells([int(x) for x in a.n.split(",")], [int(x) for x in a.T.split(",")],
                        [int(x) for x in a.seeds.split(",")])
    (out / "results").mkdir(exist_ok=True)
    (out / "locks").mkdir(exist_ok=True)
    for i, (n, T, s) in enumerate(cells):
        path = out / "results" / f"n{n}_T{T}_s{s}.json"
        if path.is_file() or not claim(out / "locks" / f"n{n}_T{T}_s{s}"):
            continue
        log(out, f"cell {i + 1}/{len(cells)}: n={n} T={T:,} seed={s}")
        res = run_cell(out, a, tok, streams, n, T, s)
        path.write_text(json.dumps(res, indent=1) + "\n")
        if not a.keep:
            shutil.rmtree(out / "cells" / f"n{n}_T{T}_s{s}", ignore_errors=True)
        dense, btm = res["nll"]["dense"], res["nll"]["btm_ensemble"]
        ind = sum(math.exp(btm[d]) for d in res["train_domains"]) / n
        ind_dense = sum(math.exp(dense[d]) for d in res["train_domains"]) / n
        log(out, f"cell {i + 1}/{len(cells)} done in {res['seconds']:.0f}s: in-domain mean ppl "
                 f"BTM {ind:.2f} vs dense {ind_dense:.2f}")
    summarize(out / "results", out / "summary")


if __name__ == "__main__":
    main()
