"""The values of a training run: its configuration, progress reports and result.

:class:`TrainConfig` is the one training budget/config type: BTM (:mod:`experts.btm.operations`),
LoRA training (:mod:`experts.training.lora`), the API (``app.protocol.btm.BudgetIn``, validated into
it by field name, with its defaults read from here) and the CLI all use it. LoRA's different
defaults are one named preset, :meth:`TrainConfig.lora` (:data:`LORA_PRESET`).
Re-exported by :mod:`experts.training.lm`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final, Literal

__all__ = ["LORA_PRESET", "TrainConfig", "TrainProgress", "TrainResult", "TrainingCancelled"]

LORA_PRESET: Final = MappingProxyType({"lr": 3e-3, "warmup_steps": 10, "weight_decay": 0.0})
"""What a LoRA adapter trains with unless told otherwise (see :meth:`TrainConfig.lora`): a higher
learning rate (the factors start at zero, B = 0, and only a few thousand parameters move, so they
need larger steps than a full model), a shorter warm-up (adapters train for a few hundred steps) and
no weight decay (decaying the low-rank factors shrinks the adapter itself towards "no change")."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train. At least one of `max_tokens` / `max_seconds` must be set; training stops at whichever is
    reached first.

    - `max_tokens`: token budget; tokens consumed = steps * batch_size * seq_len. Training runs
      `ceil(max_tokens / (batch_size * seq_len))` steps (it stops once the budget is reached, so it may
      overshoot by less than one batch).
    - `max_seconds`: wall-clock budget for the whole call, periodic evaluations, checkpoints and the final
      evaluation included. A step is not started when it (plus the final evaluation) is predicted to end past
      the budget, except the first: at least one step is always taken. With a time budget the learning-rate
      schedule progresses by the elapsed fraction of the budget, so results are not bit-reproducible.
    - Learning rate: linear warm-up over the first `warmup_steps` steps multiplied by a decay from `lr` to
      `lr * min_lr_ratio` over the whole budget (`schedule`: "linear" or "cosine" in the budget fraction). The
      warm-up is not clipped to the budget: with very small budgets the peak rate is simply not reached.
    - AdamW (`betas`, `weight_decay` on matrices and embeddings only, not on biases and LayerNorm weights),
      gradient-norm clipping at `grad_clip` (0 disables).
    - Validation (when `val_ids` is given): every `eval_every` steps (default 100) and at the end, on the
      first `eval_tokens` (default 8192) tokens of the validation stream (`evaluate_loss`, so the numbers
      are comparable between evaluations).
    - `bf16`: `torch.autocast(dtype=torch.bfloat16)` for the training forward pass and the evaluations when
      the device supports bf16 natively (on CPU: avx512_bf16 or AMX); silently fp32 otherwise.
    - `attn_implementation`: attention kernel used while training ("eager" is the fastest on CPU for small
      models); the model's own implementation is restored afterwards. None keeps the model's.
    - Resuming a longer run (BTM §1.3, spec: an expert continues the seed's schedule): `start_step` is the
      number of optimizer steps already taken before this call (the warm-up counts from the run's start), and
      `schedule_span` = (a, b) the part of the learning-rate schedule this call covers: at fraction f of this
      call's budget the schedule stands at a + (b - a) * f. The defaults (0, (0, 1)) are a whole run.
    - `seed`: seeds the batch sampler (a private `torch.Generator`) and `torch.manual_seed` (dropout). With a
      token budget, the same seed, data and initial weights give identical weights.
    """

    max_tokens: int | None = None
    max_seconds: float | None = None
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: Literal["linear", "cosine"] = "linear"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_tokens: int = 8192
    bf16: bool = True
    seed: int = 0
    attn_implementation: str | None = "eager"
    start_step: int = 0
    schedule_span: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.max_tokens is None and self.max_seconds is None:
            raise ValueError("set a token budget (max_tokens) or a time budget (max_seconds), or both")
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or self.max_tokens <= 0):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.max_seconds is not None and not (self.max_seconds > 0 and math.isfinite(self.max_seconds)):
            raise ValueError(f"max_seconds must be a positive number, got {self.max_seconds!r}")
        for name in ("batch_size", "seq_len", "eval_every", "eval_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be within [0, 1], got {self.min_lr_ratio!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {self.start_step!r}")
        a, b = self.schedule_span
        if not 0.0 <= a <= b <= 1.0:
            raise ValueError(f"schedule_span must be (a, b) with 0 <= a <= b <= 1, got {self.schedule_span!r}")

    @classmethod
    def lora(cls, **fields: Any) -> TrainConfig:
        """The LoRA preset: these defaults with :data:`LORA_PRESET` on top, then `fields` on top of both."""
        return cls(**{**LORA_PRESET, **fields})

    def scaled(self, fraction: float) -> TrainConfig:
        """This config with its token and time budgets multiplied by `fraction` (BTM's pipeline splits)."""
        return replace(self, max_tokens=int(self.max_tokens * fraction) if self.max_tokens else None,
                       max_seconds=self.max_seconds * fraction if self.max_seconds else None)

    def schedule_position(self, fraction: float) -> float:
        """Where the schedule stands (0..1) at `fraction` of this call's budget (see `schedule_span`)."""
        a, b = self.schedule_span
        return a + (b - a) * min(max(fraction, 0.0), 1.0)

    def run_lr(self, step: int, fraction: float) -> float:
        """Learning rate for this call's step `step` (0-based) at `fraction` of its budget, counting
        `start_step` earlier steps and mapping the fraction into `schedule_span` (a resumed run)."""
        return self.lr_at(self.start_step + step, self.schedule_position(fraction))

    def lr_at(self, step: int, fraction: float) -> float:
        """Learning rate for optimizer step `step` (0-based) taken at `fraction` (0..1) of the budget."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        p = min(max(fraction, 0.0), 1.0)
        if self.schedule == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * p))
        else:
            decay = 1.0 - p
        return self.lr * warm * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * decay)


@dataclass(frozen=True)
class TrainProgress:
    step: int  # optimizer steps done
    tokens: int  # training tokens consumed (step * batch_size * seq_len)
    elapsed_s: float  # wall clock since the call started (evaluations included)
    tokens_per_s: float  # tokens / elapsed_s
    train_loss: float  # mean training loss (nats/token) over the steps since the previous report
    val_loss: float | None  # latest validation loss (None before the first evaluation or without val_ids)
    lr: float  # learning rate of the latest step
    fraction: (
        float  # 0..1 of the budget (the larger of the token and time fractions); 1.0 in the final report
    )
    eta_s: float | None  # estimated seconds left (None before the first step); 0.0 in the final report


@dataclass(frozen=True)
class TrainResult:
    steps: int
    tokens: int
    elapsed_s: float
    final_train_loss: float  # mean over the last (up to 20) steps; nan when no step was taken
    final_val_loss: float | None  # validation loss at the end (latest periodic one when cancelled)
    val_history: list[tuple[int, float]]  # (step, validation loss)
    cancelled: bool
    # the optimiser's state_dict at the end (AdamW moments and step counts), to resume the run (BTM §1.3)
    optimizer_state: dict[str, Any] | None = field(default=None, repr=False, compare=False)


class TrainingCancelled(Exception):
    """For callers (job runners) that want to turn a cancelled `TrainResult` into an exception.

    `train_causal_lm` itself never raises it: it returns with `cancelled=True` so the caller decides what to
    keep.
    """
