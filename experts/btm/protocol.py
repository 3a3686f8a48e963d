"""The BTM protocol as the paper runs it: compute matching, the seed's resumable state, dev-data priors.

Spec: shared/specs/btm.md §1.2-1.4 and §2.3 (tags there say how sure each point is).

- Compute matching (§1.2 [CODE]): the dense Transformer-LM takes N updates at batch B. The seed is that run
  stopped at S = seed_fraction x N. Every first-round expert resumes the seed at update S with its optimizer
  state and schedule position (§1.3 [CODE]: the fairseq checkpoint is copied with only the dataloader reset)
  and takes the same N - S updates as the dense model's second half at 1/n of the batch (§1.2 [CODE]: 8
  ELMs on 1/8 of the GPUs, equal updates). So seed + n experts use exactly the dense model's tokens.
  `batch_split="full"` is the alternative kept for comparison: full batch, (N - S)/n updates per expert.
- Branching: first-round experts branch from the seed (`branch_from="seed"`, §1.3 [CODE]). Domains added
  later branch from the posterior-weighted average of the experts (§1.3 [ABS]/[RECALL]), the weights being
  the cached prior (§2.3 [CODE]) of those experts on >= 100 held-out dev sequences of the new domain, with a
  fresh optimizer (§1.3 [INTERP]: no state to inherit from a mixture). `branch_from="posterior"` is the
  older sequential variant: every expert after the first branches from the ones trained before it.
- The seed's state travels with its model directory: `optimizer.pt` (AdamW moments) and
  `trainer_state.json` (updates taken, schedule position, batch).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from experts.btm.mixture.posterior import bayes_posterior, ema_update
from experts.training.config import TrainConfig

BRANCH_FROM = ("seed", "posterior")
BATCH_SPLITS = ("paper", "full")
DEV_SEQUENCES = 100  # spec §2.3: the cached prior from ~100 dev sequences (DEMix README's nominal N)
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"


@dataclass(frozen=True)
class Plan:
    """How one BTM run spends the dense model's budget (spec §1.2-1.4)."""

    n_experts: int
    batch_split: str
    total_steps: int | None  # N, the dense model's updates (None with a time budget only)
    seed_steps: int | None  # S
    seed: TrainConfig  # updates 0..S at batch B, schedule [0, S/N]
    dense_rest: TrainConfig  # the dense model's second half: updates S..N at batch B, schedule [S/N, 1]
    expert: TrainConfig  # one first-round expert: resumes at S, schedule [S/N, 1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def plan_budget(budget: TrainConfig, n_experts: int, *, seed_fraction: float = 0.5,
                batch_split: str = "paper") -> Plan:
    """Split a dense-model budget into the seed phase, the dense model's second half and one expert.

    With a token budget the update counts are exact: N = ceil(T / (B x L)), S = round(seed_fraction x N)
    (at least 1, at most N - 1). "paper": each expert takes N - S updates at batch B / n (B must be a
    multiple of n). "full": each expert takes ceil((N - S) / n) updates at batch B. With a time budget only,
    the seed gets seed_fraction of the time, each expert (1 - seed_fraction) / n of it, and an expert's
    `start_step` is set from the seed's recorded state (`resume_config`)."""
    check_choice(batch_split, BATCH_SPLITS, "batch_split")
    if n_experts < 1:
        raise ValueError("a BTM run needs at least one expert")
    if not 0.0 < seed_fraction < 1.0:
        raise ValueError("seed_fraction must be strictly between 0 and 1")
    B, L = budget.batch_size, budget.seq_len
    if batch_split == "paper" and B % n_experts:
        raise ValueError(f"batch_split 'paper' gives each of the {n_experts} experts 1/{n_experts} of the batch: "
                         f"batch_size {B} must be a multiple of {n_experts}")
    expert_batch = B // n_experts if batch_split == "paper" else B
    secs = budget.max_seconds
    if budget.max_tokens is None:  # time budget: fractions of the schedule, update counts follow from speed
        s = seed_fraction
        return Plan(n_experts, batch_split, None, None,
                    replace(budget, max_seconds=secs * s, schedule_span=(0.0, s)),  # type: ignore[operator]
                    replace(budget, max_seconds=secs * (1 - s), schedule_span=(s, 1.0)),  # type: ignore[operator]
                    replace(budget, batch_size=expert_batch, max_seconds=secs * (1 - s) / n_experts,  # type: ignore[operator]
                            schedule_span=(s, 1.0)))
    N = max(2, math.ceil(budget.max_tokens / (B * L)))
    S = min(N - 1, max(1, round(seed_fraction * N)))
    split = S / N
    expert_steps = N - S if batch_split == "paper" else math.ceil((N - S) / n_experts)

    def part(fraction: float) -> float | None:
        return secs * fraction if secs is not None else None

    seed = replace(budget, max_tokens=S * B * L, max_seconds=part(split), schedule_span=(0.0, split))
    dense_rest = replace(budget, max_tokens=(N - S) * B * L, max_seconds=part(1 - split), start_step=S,
                         schedule_span=(split, 1.0))
    expert = replace(budget, batch_size=expert_batch, max_tokens=expert_steps * expert_batch * L,
                     max_seconds=part((1 - split) / n_experts), start_step=S, schedule_span=(split, 1.0))
    return Plan(n_experts, batch_split, N, S, seed, dense_rest, expert)


def resume_config(config: TrainConfig, state: dict[str, Any] | None) -> TrainConfig:
    """`config` starting at the saved run's update count (a time-budget plan learns S from the seed)."""
    if not state:
        return config
    return replace(config, start_step=int(state.get("step", config.start_step)))


# -- the seed's resumable state ---------------------------------------------------------------------------
def save_trainer_state(model_dir: Path, optimizer_state: dict[str, Any] | None, config: TrainConfig,
                       steps: int, plan: Plan | None = None) -> None:
    """Write the optimizer state and the schedule position next to a saved model (spec §1.3)."""
    model_dir = Path(model_dir)
    if optimizer_state is not None:
        tmp = model_dir / f".{OPTIMIZER_FILE}.tmp"
        torch.save(optimizer_state, tmp)
        os.replace(tmp, model_dir / OPTIMIZER_FILE)
    info = {"step": config.start_step + steps, "schedule_position": config.schedule_span[1],
            "batch_size": config.batch_size, "seq_len": config.seq_len, "lr": config.lr,
            "warmup_steps": config.warmup_steps, "schedule": config.schedule, "min_lr_ratio": config.min_lr_ratio,
            "total_steps": plan.total_steps if plan else None}
    (model_dir / STATE_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def load_trainer_state(model_dir: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(optimizer state, trainer state) saved with a model; (None, None) when it has none."""
    model_dir = Path(model_dir)
    opt_path, state_path = model_dir / OPTIMIZER_FILE, model_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    opt = torch.load(opt_path, map_location="cpu", weights_only=True) if opt_path.is_file() else None
    return opt, state


# -- held-out dev data and the cached prior ----------------------------------------------------------------
def dev_sequences(ids: torch.Tensor, n: int = DEV_SEQUENCES, length: int = 128) -> list[list[int]]:
    """The first `n` non-overlapping `length`-token sequences of a held-out (validation) stream; fewer when
    the stream is shorter (callers that need n check the count)."""
    total = int(ids.numel())
    count = min(n, total // length)
    return [ids[i * length:(i + 1) * length].tolist() for i in range(count)]


# Spec §2.3 ([CODE] EMA α = 0.3, adjust=False; [INTERP] paper form: each sequence's whole-context posterior),
# sequence by sequence, each scored with the running prior: the same numbers as `estimate_prior(...,
# mode="paper", batch_size=1)`, from per-sequence log-likelihoods computed in one batched pass.
def prior_from_logliks(seq_loglik: torch.Tensor, decay: float = 0.3) -> torch.Tensor:
    """seq_loglik [N, k]: log p_j(sequence) (its scored tokens) -> the frozen prior [k] (float64)."""
    ll = torch.as_tensor(seq_loglik, dtype=torch.float64)
    if ll.ndim != 2 or ll.shape[0] == 0:
        raise ValueError("seq_loglik must be a non-empty [N, k] tensor")
    k = ll.shape[1]
    prior: torch.Tensor | None = None
    for row in ll:
        current = prior if prior is not None else torch.full((k,), 1.0 / k, dtype=torch.float64)
        prior = ema_update(prior, bayes_posterior(torch.log(current), row), decay)
    assert prior is not None
    return prior
