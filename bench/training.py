"""Training throughput: `experts.training.lm.train_causal_lm` vs a plain transformers `Trainer` loop.

Same freshly initialised GPT-2 (new_gpt2, same seed), same token stream (the stdlib's Python source, tokenised
with a byte-level BPE of 4096 tokens trained here), same batch (8 x 128), same optimiser settings (AdamW,
fused in both, lr 2e-3, betas 0.9/0.95, wd 0.1, clip 1.0, warm-up then linear decay), bf16 autocast in both
(`TrainingArguments(bf16=True, use_cpu=True)`), no evaluation, no saving, no logging. Tokens/s is the steady
state of a run: time stamps at the end of every step (a TrainerCallback for the Trainer, the checkpoint hook
for ours), the first steps left out. The machine this runs on has noisy neighbours (slow spells of several
times), so the loops run interleaved for a few rounds, fresh model each run, and two robust figures are
printed: the fastest run's rate and the rate implied by the 25th-percentile step time over all runs. `load` is
the 1-minute load average when a size finished: figures taken above about 1 are not trustworthy.

The Trainer runs twice: on the model as constructed (transformers' default attention, "sdpa") and with the
"eager" attention our loop switches to while training, so the ratio can be split into kernel choice and loop
overhead.

    .venv/bin/python bench/training.py            # about 1 minute on 2 cores
    .venv/bin/python bench/training.py --rounds 2 # quicker
"""

from __future__ import annotations

import argparse
import glob
import itertools
import logging
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from experts.data.tokens import tokenize_text
from experts.training.lm import TrainConfig, new_gpt2, train_causal_lm

BATCH, SEQ = 8, 128


def corpus(max_chars: int = 1_500_000) -> str:
    stdlib = sysconfig.get_paths()["stdlib"]
    parts, size = [], 0
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "\n\n".join(parts)


def build_tokenizer(text: str):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [text], vocab_size=4096, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


WARM = 3  # steps excluded from the timing (one-time costs: kernel selection, lazy imports, allocator)


def _durations(stamps: list[float]) -> list[float]:
    """Step durations (s) from the wall-clock time stamps taken at the end of each step, warm-up left out."""
    timed = stamps[WARM - 1 :]
    return [b - a for a, b in itertools.pairwise(timed)]


def ours(model, ids: torch.Tensor, steps: int) -> list[float]:
    config = TrainConfig(max_tokens=steps * BATCH * SEQ, batch_size=BATCH, seq_len=SEQ, warmup_steps=20)
    stamps: list[float] = []
    # the checkpoint hook, called after every step, is only used as a clock here
    train_causal_lm(
        model,
        ids,
        None,
        config,
        checkpoint=lambda m, s: stamps.append(time.perf_counter()),
        checkpoint_every=1,
    )
    return _durations(stamps)


class Windows(torch.utils.data.Dataset):
    """Random windows of SEQ tokens (a fixed, seeded set), as the Trainer wants them."""

    def __init__(self, ids: torch.Tensor, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, ids.numel() - SEQ, (n,), generator=gen)
        self.x = ids[starts.unsqueeze(1) + torch.arange(SEQ)]

    def __len__(self) -> int:
        return self.x.size(0)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def trainer(model, ids: torch.Tensor, steps: int, workdir: str) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=workdir,
        use_cpu=True,
        bf16=True,
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=2e-3,
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.1,
        max_grad_norm=1.0,
        warmup_steps=20,
        lr_scheduler_type="linear",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    tr = Trainer(model=model, args=args, train_dataset=Windows(ids, steps * BATCH), callbacks=[Clock()])
    tr.train()
    return _durations(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default: per size)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed runs per loop and size")
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    text = corpus()
    tok = build_tokenizer(text)
    ids = tokenize_text(tok, text)
    print(
        f"corpus: {len(text) / 1e6:.1f} MB stdlib source -> {ids.numel():,} tokens (BPE {len(tok)}), "
        f"{torch.get_num_threads()} threads, setup {time.perf_counter() - t0:.1f} s",
        flush=True,
    )

    sizes = [(2, 128, 40), (4, 256, 25)]
    with tempfile.TemporaryDirectory() as workdir:
        for n_layer, n_embd, default_steps in sizes:
            steps = args.steps or default_steps

            def fresh(attn: str | None = None, n_layer: int = n_layer, n_embd: int = n_embd):
                m = new_gpt2(
                    len(tok),
                    n_layer=n_layer,
                    n_embd=n_embd,
                    n_head=4,
                    n_positions=256,
                    bos_token_id=tok.eos_token_id,
                    eos_token_id=tok.eos_token_id,
                    seed=0,
                )
                if attn is not None:
                    m.set_attn_implementation(attn)
                return m

            default_attn = fresh().config._attn_implementation
            loops = {
                "ours": lambda steps=steps: ours(fresh(), ids, steps),
                f"trainer ({default_attn})": lambda steps=steps: trainer(fresh(), ids, steps, workdir),
                "trainer (eager)": lambda steps=steps: trainer(fresh("eager"), ids, steps, workdir),
            }
            runs: dict[str, list[list[float]]] = {name: [] for name in loops}
            for _ in range(args.rounds):  # interleaved, so a slow spell of the machine hits every loop alike
                for name, run in loops.items():
                    runs[name].append(run())
            tps = BATCH * SEQ
            # best: the fastest run's mean rate; p25: from the 25th-percentile step time over all runs
            # (robust to a busy machine: slow spells only lengthen some steps)
            best = {name: max(len(d) * tps / sum(d) for d in r) for name, r in runs.items()}
            p25 = {
                name: tps / statistics.quantiles([x for d in r for x in d], n=4)[0]
                for name, r in runs.items()
            }
            base = f"trainer ({default_attn})"
            print(
                f"\n{n_layer} layers x {n_embd}, vocab {len(tok)}, batch {BATCH}x{SEQ}, bf16, "
                f"{args.rounds} rounds of {steps} steps "
                f"(tokens/s, steady state; load {os.getloadavg()[0]:.1f}):"
            )
            print(f"  {'loop':<18} {'best run':>9} {'p25 step':>9}   vs plain Trainer (best, p25)")
            for name in loops:
                print(
                    f"  {name:<18} {best[name]:>9,.0f} {p25[name]:>9,.0f}   "
                    f"{best[name] / best[base]:.2f}x {p25[name] / p25[base]:.2f}x"
                )
            print(
                f"  ratio ours / trainer ({default_attn}): {best['ours'] / best[base]:.2f} (best run), "
                f"{p25['ours'] / p25[base]:.2f} (p25 step); ours / trainer (eager): "
                f"{best['ours'] / best['trainer (eager)']:.2f}, {p25['ours'] / p25['trainer (eager)']:.2f}",
                flush=True,
            )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
