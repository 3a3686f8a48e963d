"""Merge-session evaluations per second vs the naive re-merge-and-reload approach and the forward-pass floor.

    python bench/merge_sessions.py                 # N=20 adapters, 32 examples x 128 tokens, demo-size base
    python bench/merge_sessions.py --quick         # smaller, for a smoke run
    python bench/merge_sessions.py --threads 1     # 1 is faster when other processes load the CPU

Setup (built locally, nothing downloaded): a GPT-2 of the demo pool's size (4 layers x 256, BPE vocab 4096,
random weights: speed does not depend on the values), N rank-8 LoRA adapters (lora_alpha 16, on c_attn,
c_proj, c_fc: every linear layer) registered on it, and 32 validation texts of exactly 128 tokens.

Measured in one run, same batches, same candidates (random alpha in [0.5, 1], beta in [-0.3, 0.3]):
* floor: one forward pass over the validation set with the loss (the session's own loss code, no merge),
  and for reference the standard `model(input_ids, attention_mask, labels).loss` forward on the base;
* session (dense / peft): `MergeSession.evaluate`: EvoPlan candidate + W = W0 + s B A (dense) or factors
  written into peft's LoRA parameters (peft), then the same forward pass;
* naive: what the authors' service does per query: read the N adapter files, merge them with the
  reference Evo operator (`merging.lora.evo_lora`), save the merged adapter, `PeftModel.from_pretrained`
  on the resident base, loss with `model(input_ids, attention_mask, labels).loss` per batch, `unload()`;
  and the same with the base also reloaded from disk per query ("rebuild").
All three losses are checked against each other. Ratios: session evals/s over naive evals/s (issue target
>= 5x) and session time per query over the floor (target <= 1.5x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that spin while waiting stall badly when another process holds a core (measured: a
# forward 2-10x slower with 2 threads on a busy 2-core box); passive waiting keeps 2 threads useful.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from bench.gateways import randomize_lora

TARGETS = ("c_attn", "c_proj", "c_fc")


def build(root: Path, n: int, n_layer: int, n_embd: int, vocab: int, rank: int, seed: int = 0):
    """Repository with a base and n adapters; returns (repo, texts)."""
    import pydoc_data.topics

    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from experts.hf.tokenizer import train_bpe_tokenizer
    from experts.runtime import open_repository

    texts = [v for _, v in sorted(pydoc_data.topics.topics.items())]
    tok = train_bpe_tokenizer(texts, vocab_size=vocab)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64), n_positions=256,
                     vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    base_dir = root / "src" / "base"
    GPT2LMHeadModel(cfg).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    repo = open_repository(root / "data", database_url=f"sqlite:///{root / 'registry.db'}", max_loaded_models=2,
                           max_loaded_bytes=1 << 30)
    repo.register_from_dir("base", base_dir)
    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(base_dir),
                                LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        randomize_lora(peft_model, g, 0.02)
        d = root / "src" / f"ad{i:02d}"
        peft_model.save_pretrained(d)
        repo.register_from_dir(f"ad{i:02d}", d, base="base", tags=["pool"])
    return repo, texts


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def naive_evaluator(repo, session, examples_batches, *, reload_base: bool = False):
    """Per query: load adapters from disk, reference merge, save, PeftModel.from_pretrained, loss, unload.

    reload_base: also load the base from disk for every query ("rebuild" the model)."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from merging.lora import evo_lora, lora_modules

    base_dir = repo.artifact_dir(repo.record("base"))
    resident = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    dirs = [repo.artifact_dir(repo.record(e)) for e in session.experts]
    cfg_text = (dirs[0] / "adapter_config.json").read_text()
    work = Path(tempfile.mkdtemp(prefix="naive-"))

    def evaluate(alpha, beta) -> float:
        adapters = [load_file(str(d / "adapter_model.safetensors")) for d in dirs]
        merged = {}
        for a_key, b_key in lora_modules(adapters[0].keys()).values():
            a, b = evo_lora([x[a_key] for x in adapters], [x[b_key] for x in adapters], alpha, beta)
            merged[a_key], merged[b_key] = a.contiguous(), b.contiguous()
        out = work / "merged"
        out.mkdir(exist_ok=True)
        save_file(merged, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(cfg_text)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval() if reload_base else resident
        model = PeftModel.from_pretrained(base, out).eval()
        total, n = 0.0, 0
        with torch.inference_mode():
            for b in examples_batches:
                labels = b.ids.clone()
                labels[:, 1:][~b.mask] = -100
                labels[:, 0] = -100
                loss = model(input_ids=b.ids, attention_mask=b.attention_mask, labels=labels).loss
                total += float(loss) * b.n_targets
                n += b.n_targets
        model.unload()  # back to the plain base for the next query
        return total / n

    def hf_forward() -> float:
        """The standard forward on the plain base: model(input_ids, attention_mask, labels).loss per batch."""
        total, n = 0.0, 0
        with torch.inference_mode():
            for b in examples_batches:
                labels = b.ids.clone()
                labels[:, 1:][~b.mask] = -100
                labels[:, 0] = -100
                total += float(resident(input_ids=b.ids, attention_mask=b.attention_mask, labels=labels).loss) \
                    * b.n_targets
                n += b.n_targets
        return total / n

    evaluate.hf_forward = hf_forward  # type: ignore[attr-defined]
    return evaluate, work


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--evals", type=int, default=12, help="timed queries per method")
    p.add_argument("--threads", type=int)
    p.add_argument("--quick", action="store_true", help="2 layers x 128, vocab 1024, 6 queries")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.embd, args.vocab, args.evals = 2, 128, 1024, 6
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from experts.evo.sessions import LossOptions, MergeSessionManager, ValidationSpec

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    import warnings

    warnings.filterwarnings("ignore")
    root = Path(tempfile.mkdtemp(prefix="bench-msess-"))
    try:
        t0 = time.perf_counter()
        repo, texts = build(root, args.n, args.layers, args.embd, args.vocab, args.rank)
        long_texts = [t for t in texts if len(t) > 8 * args.tokens][: args.examples]
        examples = tuple({"text": t[: 12 * args.tokens]} for t in long_texts)
        loss_opts = LossOptions(max_tokens_per_example=args.tokens)
        mgr = MergeSessionManager(repo, max_sessions=4)
        t = time.perf_counter()
        dense = mgr.create("base", {"tags": ["pool"]}, ValidationSpec(examples=examples), loss=loss_opts,
                           budget=10**6, mode="dense")
        create_s = time.perf_counter() - t
        peft = mgr.create("base", {"tags": ["pool"]}, ValidationSpec(examples=examples), loss=loss_opts,
                          budget=10**6, mode="peft")
        setup_s = time.perf_counter() - t0
        assert dense.n_examples == args.examples and all(b.ids.shape[1] == args.tokens for b in dense.batches)
        g = torch.Generator().manual_seed(0)
        cands = [((0.5 + 0.5 * torch.rand(args.n, generator=g)).tolist(),
                  (0.6 * torch.rand(args.n, generator=g) - 0.3).tolist()) for _ in range(args.evals)]
        naive, work = naive_evaluator(repo, dense, dense.batches)
        naive_rb, work_rb = naive_evaluator(repo, dense, dense.batches, reload_base=True)

        # warm-up (allocations, oneDNN primitives), and the losses cross-checked
        l_dense = dense.evaluate(*cands[0])
        l_peft = peft.evaluate(*cands[0])
        l_naive = naive(*cands[0])
        naive_rb(*cands[0])
        dense._loss()
        it = iter(range(10**9))

        def run_dense():
            a, b = cands[next(it) % len(cands)]
            dense.evaluate(a, b)

        def run_peft():
            a, b = cands[next(it) % len(cands)]
            peft.evaluate(a, b)

        def run_naive():
            a, b = cands[next(it) % len(cands)]
            naive(a, b)

        def run_naive_rb():
            a, b = cands[next(it) % len(cands)]
            naive_rb(a, b)

        # interleaved rounds, so load from other processes hits every method alike
        times: dict[str, list[float]] = {"floor": [], "floor_hf": [], "session_dense": [], "session_peft": [],
                                         "naive": [], "naive_reload_base": []}
        rounds = max(1, args.evals // 3)
        for _ in range(rounds):
            times["floor"] += timed(dense._loss, 3)
            times["floor_hf"] += timed(naive.hf_forward, 3)
            times["session_dense"] += timed(run_dense, 3)
            times["session_peft"] += timed(run_peft, 3)
            times["naive"] += timed(run_naive, 3)
            times["naive_reload_base"] += timed(run_naive_rb, 3)
        med = {k: statistics.median(v) for k, v in times.items()}
        eps = {k: 1.0 / v for k, v in med.items()}
        result = {
            "setup": {"n_adapters": args.n, "examples": args.examples, "tokens_per_example": args.tokens,
                      "scored_tokens": dense.n_tokens, "model": f"gpt2 {args.layers}x{args.embd}, vocab {args.vocab}",
                      "rank": args.rank, "targets": list(TARGETS), "threads": torch.get_num_threads(),
                      "load_average": round(os.getloadavg()[0], 2), "session_create_s": round(create_s, 3),
                      "setup_s": round(setup_s, 1), "queries_per_method": len(times["floor"])},
            "median_s": {k: round(v, 4) for k, v in med.items()},
            "evals_per_s": {k: round(v, 2) for k, v in eps.items()},
            "ratios": {"session_vs_naive": round(eps["session_dense"] / eps["naive"], 2),
                       "session_peft_vs_naive": round(eps["session_peft"] / eps["naive"], 2),
                       "session_vs_naive_reload_base": round(eps["session_dense"] / eps["naive_reload_base"], 2),
                       "naive_over_floor": round(med["naive"] / med["floor"], 3),
                       "session_over_floor": round(med["session_dense"] / med["floor"], 3),
                       "session_over_standard_forward": round(med["session_dense"] / med["floor_hf"], 3),
                       "session_peft_over_floor": round(med["session_peft"] / med["floor"], 3)},
            "loss_check": {"dense": l_dense, "peft": l_peft, "naive": l_naive,
                           "max_abs_diff": max(abs(l_dense - l_peft), abs(l_dense - l_naive))},
        }
        s = result["setup"]
        print(f"Merge sessions: N={s['n_adapters']} rank-{s['rank']} adapters on {s['model']}; {s['examples']} "
              f"examples x {s['tokens_per_example']} tokens ({s['scored_tokens']} scored); {s['threads']} threads, "
              f"load average {s['load_average']}; medians of {s['queries_per_method']} queries, interleaved")
        print(f"{'method':<34}{'s/query':>10}{'evals/s':>10}")
        for key, label in (("floor", "floor: one forward pass + loss"),
                           ("floor_hf", "standard HF forward (labels=)"),
                           ("session_dense", "session evaluate (dense)"),
                           ("session_peft", "session evaluate (peft)"),
                           ("naive", "naive: merge, save, reload (peft)"),
                           ("naive_reload_base", "naive, base reloaded too")):
            print(f"{label:<34}{med[key]:>10.4f}{eps[key]:>10.2f}")
        r = result["ratios"]
        print(f"session (dense) vs naive: {r['session_vs_naive']:.2f}x the evals/s (target >= 5x); "
              f"session / floor: {r['session_over_floor']:.3f} (target <= 1.5)")
        print(f"session (dense) vs naive with the base reloaded: {r['session_vs_naive_reload_base']:.2f}x; "
              f"naive / floor: {r['naive_over_floor']:.3f} (bounds session vs naive at about that for a session "
              "that costs one forward pass)")
        print(f"session (peft)  vs naive: {r['session_peft_vs_naive']:.2f}x; session / floor: "
              f"{r['session_peft_over_floor']:.3f}")
        print(f"losses: dense {l_dense:.6f}, peft {l_peft:.6f}, naive {l_naive:.6f} "
              f"(max diff {result['loss_check']['max_abs_diff']:.2e}); session created in {create_s:.2f} s")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(work_rb, ignore_errors=True)
        repo.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
