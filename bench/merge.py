"""In-memory Evo-Merging candidate materialisation: fast path vs re-merging from scratch.

Two cases, measured in one run:

* full form: N=8 experts of a ~10M-parameter GPT-2 configuration (random weights made
  here), theta = base + sum_i beta_i S_{alpha_i}(theta_i - base), written into the
  parameters of one resident model;
* LoRA form: N=20 rank-8 adapters on a GPT-2-small-shaped model (c_attn, attn.c_proj,
  mlp.c_fc, mlp.c_proj), A = sum_i beta_i S_{alpha_i}(A_i), B = sum_i beta_i B_i, written
  into preallocated factor tensors.

For each: ``merging.evo.EvoPlan`` with a new alpha per candidate (Evo stage 1) and with a
fixed alpha and new beta (stage 2), each against a baseline doing the same work with the
reference functions (``merging.methods.merge_tensor("evo")`` / ``merging.lora.evo_lora``) over
the same in-memory tensors:

* stage 1: re-merge from scratch (every candidate has a new alpha, so both sides sparsify);
* stage 2: the reference with the sparsified stack cached too (S_alpha(x_i) computed once for
  the fixed alpha, as the fast path caches it; then per candidate the reference's weighted sum
  base + sum_i beta_i W_i). Re-merging from scratch (re-sparsifying every candidate) is also
  shown, but it does work the fast path skips, so its ratio is not the fast path's gain.

And the bandwidth floor: the bytes a candidate must touch (read the N stacked inputs and the
base, write the output) divided by the memory bandwidth measured in the same run (the larger
of memcpy read+write and a read-only sum/GEMV). Times are medians (and best) over the
candidates; ratios use medians. On a shared machine, ``--threads 1`` gives steadier numbers
(OpenMP regions stall when another process holds the other core).

    .venv/bin/python bench/merge.py [--quick] [--threads T] [--candidates K] [--case all|full|lora]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merging.evo import EvoPlan
from merging.lora import evo_lora, lora_modules
from merging.methods import merge_tensor
from merging.ops import evo_sparsify

Candidate = tuple[list[float], list[float]]


def emit(line: str) -> None:
    """Write one line of the report to stdout."""
    sys.stdout.write(line + "\n")


def bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> tuple[float, float]:
    """(memcpy, read) bandwidth in bytes/s, best of ``reps``, on a large float32 buffer.

    memcpy counts bytes read + written by ``copy_``; read is the best of a ``sum`` and a
    GEMV over the buffer viewed as (8, n/8) (the access pattern of the stage-2 path). The
    floor uses the larger of the two.
    """
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    mat, vec = src.view(8, -1), torch.ones(8)
    out = torch.empty(mat.shape[1])
    best_copy = best_read = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best_copy = min(best_copy, time.perf_counter() - t)
        t = time.perf_counter()
        src.sum()
        best_read = min(best_read, time.perf_counter() - t)
        t = time.perf_counter()
        torch.mv(mat.t(), vec, out=out)
        best_read = min(best_read, (time.perf_counter() - t) * nbytes / (nbytes + out.numel() * 4))
    return 2 * nbytes / best_copy, nbytes / best_read


def timed(fn: Callable[[Candidate], None], cands: list[Candidate]) -> tuple[float, float]:
    """(median, best) seconds per candidate, after one warm-up call."""
    fn(cands[0])
    times = []
    for c in cands:
        t = time.perf_counter()
        fn(c)
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def candidates(n: int, k: int, rng: random.Random, fixed_alpha: list[float] | None = None) -> list[Candidate]:
    out = []
    for _ in range(k + 1):
        alpha = fixed_alpha or [min(1.0, max(0.0, rng.gauss(0.9, 0.1))) for _ in range(n)]
        out.append((alpha, [rng.uniform(-1.5, 1.5) for _ in range(n)]))
    return out


def full_case(quick: bool, k: int, rng: random.Random) -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, embd, vocab = (2, 256, 4096) if quick else (4, 384, 8192)  # ~2.7M / ~10.3M parameters
    cfg = GPT2Config(
        n_layer=layers,
        n_embd=embd,
        vocab_size=vocab,
        n_head=4,
        n_positions=256,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)  # the resident model receiving candidates
    base = {k_: v.detach().clone() for k_, v in model.named_parameters()}
    n = 8
    g = torch.Generator().manual_seed(1)
    experts = [{k_: v + 0.01 * torch.randn(v.shape, generator=g) for k_, v in base.items()} for _ in range(n)]
    params = sum(v.numel() for v in base.values())
    t = time.perf_counter()
    plan = EvoPlan.full(base, experts)
    build = time.perf_counter() - t
    targets = dict(model.named_parameters())

    def fast(c: Candidate) -> None:
        plan.apply(c[0], c[1], targets)

    def slow(c: Candidate) -> None:
        per = [{"alpha": a, "beta": b} for a, b in zip(*c, strict=True)]
        with torch.no_grad():
            for name, tgt in targets.items():
                tgt.copy_(merge_tensor("evo", base[name], [e[name] for e in experts], per))

    check = candidates(n, 1, rng)[0]
    fast(check)
    got = {k_: v.detach().clone() for k_, v in targets.items()}
    slow(check)
    diff = max((got[k_] - v.detach()).abs().max().item() for k_, v in targets.items())
    # stage 2's baseline: the reference's S_alpha(theta_i - base) for the fixed alpha, computed once
    cached = {name: [evo_sparsify(e[name] - base[name], a) for e, a in zip(experts, check[0], strict=True)]
              for name in targets}

    def slow_cached(c: Candidate) -> None:
        with torch.no_grad():
            for name, tgt in targets.items():
                tgt.copy_(base[name])
                for w, b in zip(cached[name], c[1], strict=True):
                    tgt.add_(w, alpha=b)

    slow_cached(check)
    diff = max(diff, max((got[k_] - v.detach()).abs().max().item() for k_, v in targets.items()))
    stage2 = candidates(n, k, rng, fixed_alpha=check[0])
    return {
        "label": f"full N={n}, {params / 1e6:.1f}M params",
        "stage1": timed(fast, candidates(n, k, rng)),
        "stage2": timed(fast, stage2),
        "slow": timed(slow, candidates(n, max(2, k // 4), rng)),
        "slow_cached": timed(slow_cached, candidates(n, k, rng, fixed_alpha=check[0])),
        "bytes": (n + 2) * params * 4,
        "build": build,
        "diff": diff,
    }


def lora_case(quick: bool, k: int, rng: random.Random) -> dict[str, Any]:
    n, r, d, layers = 20, 8, 768, (4 if quick else 12)
    mods = {
        "attn.c_attn": (d, 3 * d),
        "attn.c_proj": (d, d),
        "mlp.c_fc": (d, 4 * d),
        "mlp.c_proj": (4 * d, d),
    }
    g = torch.Generator().manual_seed(2)
    adapters = []
    for _ in range(n):
        sd = {}
        for layer in range(layers):
            for m, (d_in, d_out) in mods.items():
                pre = f"base_model.model.transformer.h.{layer}.{m}"
                sd[f"{pre}.lora_A.weight"] = 0.02 * torch.randn(r, d_in, generator=g)
                sd[f"{pre}.lora_B.weight"] = 0.02 * torch.randn(d_out, r, generator=g)
        adapters.append(sd)
    params = sum(v.numel() for v in adapters[0].values())
    t = time.perf_counter()
    plan = EvoPlan.lora(adapters)
    build = time.perf_counter() - t
    targets = {k_: torch.empty_like(v) for k_, v in adapters[0].items()}
    pairs = list(lora_modules(adapters[0].keys()).values())

    def fast(c: Candidate) -> None:
        plan.apply(c[0], c[1], targets)

    def slow(c: Candidate) -> None:
        for a_key, b_key in pairs:
            a, b = evo_lora([x[a_key] for x in adapters], [x[b_key] for x in adapters], c[0], c[1])
            targets[a_key].copy_(a)
            targets[b_key].copy_(b)

    check = candidates(n, 1, rng)[0]
    fast(check)
    got = {k_: v.clone() for k_, v in targets.items()}
    slow(check)
    diff = max((got[k_] - v).abs().max().item() for k_, v in targets.items())
    # stage 2's baseline: S_alpha(A_i) for the fixed alpha computed once; evo_lora with alpha = 1 then
    # only sums (S_1 is the identity), as the fast path's cached stack does
    cached = {a_key: [evo_sparsify(x[a_key], al) for x, al in zip(adapters, check[0], strict=True)]
              for a_key, _ in pairs}
    ones = [1.0] * n

    def slow_cached(c: Candidate) -> None:
        for a_key, b_key in pairs:
            a, b = evo_lora(cached[a_key], [x[b_key] for x in adapters], ones, c[1])
            targets[a_key].copy_(a)
            targets[b_key].copy_(b)

    slow_cached(check)
    diff = max(diff, max((got[k_] - v).abs().max().item() for k_, v in targets.items()))
    return {
        "label": f"LoRA N={n}, r={r}, {len(pairs)} modules, {params / 1e6:.2f}M params/adapter",
        "stage1": timed(fast, candidates(n, k, rng)),
        "stage2": timed(fast, candidates(n, k, rng, fixed_alpha=check[0])),
        "slow": timed(slow, candidates(n, max(2, k // 4), rng)),
        "slow_cached": timed(slow_cached, candidates(n, k, rng, fixed_alpha=check[0])),
        "bytes": (n + 1) * params * 4,
        "build": build,
        "diff": diff,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller models and fewer candidates")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--candidates", type=int, default=None, help="candidates timed per path")
    ap.add_argument("--case", choices=("all", "full", "lora"), default="all", help="which case(s) to run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    k = args.candidates or (6 if args.quick else 20)
    rng = random.Random(0)
    copy_bw, read_bw = bandwidth(64 << 20 if args.quick else 256 << 20)
    bw = max(copy_bw, read_bw)
    emit(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; bandwidth: memcpy "
        f"{copy_bw / 1e9:.1f} GB/s (read+write), read {read_bw / 1e9:.1f} GB/s; "
        f"floor uses {bw / 1e9:.1f} GB/s"
    )
    cases = {"full": full_case, "lora": lora_case}
    rows = [fn(args.quick, k, rng) for name, fn in cases.items() if args.case in ("all", name)]
    head = (
        f"{'case':<50} {'path':<36} {'ms/cand':>9} {'best ms':>8} {'cand/s':>8} {'vs baseline':>12} "
        f"{'x floor':>8}"
    )
    emit(head)
    emit("-" * len(head))
    for row in rows:
        floor = row["bytes"] / bw
        slow, cached = row["slow"][0], row["slow_cached"][0]
        # (path, key, the baseline doing the same work: None for a baseline row itself)
        for path, key, base in (
            ("st.1 baseline: re-merge from scratch", "slow", None),
            ("st.1 EvoPlan, new alpha", "stage1", slow),
            ("st.2 baseline: reference, cached S", "slow_cached", None),
            ("st.2 EvoPlan, fixed alpha (cached)", "stage2", cached),
            ("(st.2 vs re-sparsifying: unfair)", "stage2", slow),
        ):
            med, best = row[key]
            ratio = f"{base / med:11.1f}x" if base is not None else f"{'-':>12}"
            emit(
                f"{row['label']:<50} {path:<36} {med * 1e3:9.2f} {best * 1e3:8.2f} {1 / med:8.1f} "
                f"{ratio} {med / floor:7.1f}x"
            )
        emit(f"{'':<50} {'bandwidth floor':<36} {floor * 1e3:9.2f} {'':>8} {1 / floor:8.1f} {'':>12} {1.0:7.1f}x")
        emit(f"{'':<50} plan build {row['build']:.2f} s, max |fast - reference| = {row['diff']:.1e}")


if __name__ == "__main__":
    main()
