"""The prompt/completion training loop: random batches of encoded examples, loss on the scored tokens only.

:func:`train_on_examples` is the pairs counterpart of :func:`experts.training.lm.train_causal_lm`
(token streams): same :class:`~experts.training.config.TrainConfig`, optimiser, schedule, clipping,
budgets, progress and cancellation semantics (shared through :mod:`experts.training.optim`). Batches
are right-padded (:func:`experts.data.scoring.make_batches`); a step consumes the examples' real tokens
from the token budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from experts.data.scoring import Encoded, make_batches, masked_ce_sum, mean_loss
from experts.errors import InvalidExpertError
from experts.training.config import TrainConfig, TrainProgress, TrainResult
from experts.training.optim import (
    PROGRESS_INTERVAL_S,
    autocast,
    bf16_supported,
    make_optimizer,
    model_device,
    optimizer_step,
)

__all__ = ["train_on_examples"]


def train_on_examples(
    model: Any,
    train: Sequence[Encoded],
    val: Sequence[Encoded] | None,
    config: TrainConfig,
    *,
    pad_id: int,
    on_progress: Callable[[TrainProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train `model` in place on random batches of encoded examples (loss on the scored tokens only).

    `config.batch_size` examples per step, drawn with a generator seeded by `config.seed`; a step
    consumes the examples' real tokens (no padding) from the `max_tokens` budget; the learning-rate
    schedule follows the budget fraction (`TrainConfig.lr_at`). Validation (masked mean loss over
    `val`) every `config.eval_every` steps and at the end. Returns like `train_causal_lm`; on
    `should_stop()` it returns promptly with `cancelled=True`. The model is left in eval mode.
    """
    if not train:
        raise InvalidExpertError("no training examples")
    run = _ExamplesRun(model, train, val, config, pad_id, on_progress)
    try:
        run.loop(should_stop)
        run.finish()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    return run.result()


class _ExamplesRun:
    """One `train_on_examples` call: its clock, sampler, optimiser, losses, evaluations and reports."""

    def __init__(self, model: Any, train: Sequence[Encoded], val: Sequence[Encoded] | None,
                 config: TrainConfig, pad_id: int,
                 on_progress: Callable[[TrainProgress], None] | None) -> None:
        """Start the clock, seed the sampler, build the optimiser and the validation batches."""
        self.model, self.train, self.config, self.pad_id = model, train, config, pad_id
        self.on_progress = on_progress
        self.t0 = time.perf_counter()
        self.device = model_device(model)
        self.use_bf16 = config.bf16 and bf16_supported(self.device)
        torch.manual_seed(config.seed)
        self.gen = torch.Generator().manual_seed(config.seed)
        self.optimizer = make_optimizer(model, config)
        self.val_batches = make_batches(val, batch_tokens=4096, pad_id=pad_id) if val else None
        self.step, self.tokens, self.lr = 0, 0, config.lr
        self.history: list[tuple[int, float]] = []
        self.recent: list[float] = []  # losses since the last report
        self.tail: list[float] = []  # the last <= 20 losses, for final_train_loss
        self.last_report = self.t0
        self.cancelled = False
        self.step_time: float | None = None  # EMA of the duration of one step (s)

    def fraction(self, now: float) -> float:
        """How much of the budget is spent: the larger of the token and time fractions, at most 1."""
        f = 0.0
        if self.config.max_tokens is not None:
            f = max(f, self.tokens / self.config.max_tokens)
        if self.config.max_seconds is not None:
            f = max(f, (now - self.t0) / self.config.max_seconds)
        return min(f, 1.0)

    def report(self, now: float, done: bool = False) -> None:
        """Send one TrainProgress (if anyone listens) and start a new reporting period."""
        if self.on_progress is not None:
            el = now - self.t0
            f = 1.0 if done else self.fraction(now)
            eta = 0.0 if done else (el / max(f, 1e-9) - el if self.step else None)
            train_loss = sum(self.recent) / len(self.recent) if self.recent else float("nan")
            val_loss = self.history[-1][1] if self.history else None
            self.on_progress(TrainProgress(
                step=self.step, tokens=self.tokens, elapsed_s=el,
                tokens_per_s=self.tokens / el if el else 0.0,
                train_loss=train_loss, val_loss=val_loss, lr=self.lr, fraction=f, eta_s=eta))
        self.recent = []
        self.last_report = now

    def run_eval(self) -> None:
        """Validation loss now (masked mean over the validation examples), appended to the history."""
        if self.val_batches is not None:
            self.history.append((self.step, mean_loss(self.model, self.val_batches)))
            self.model.train()

    def out_of_budget(self, now: float) -> bool:
        """True when the token budget is spent, or the next step would overrun the time budget (never
        before the first step)."""
        c = self.config
        if c.max_tokens is not None and self.tokens >= c.max_tokens:
            return True
        late = c.max_seconds is not None and now - self.t0 + (self.step_time or 0.0) > c.max_seconds
        return late and self.step > 0

    def train_step(self, now: float) -> None:
        """One optimiser step on `batch_size` random examples (right-padded into one batch)."""
        self.lr = self.config.run_lr(self.step, self.fraction(now))
        pick = torch.randint(0, len(self.train), (self.config.batch_size,), generator=self.gen).tolist()
        batch = make_batches([self.train[i] for i in pick], batch_tokens=1 << 30, pad_id=self.pad_id)[0]
        with autocast(self.device, self.use_bf16):
            loss = masked_ce_sum(self.model, batch) / batch.n_targets
        optimizer_step(self.model, self.optimizer, loss, lr=self.lr, grad_clip=self.config.grad_clip)
        self.step += 1
        self.tokens += sum(len(self.train[i].ids) for i in pick)
        value = float(loss.detach())
        self.recent.append(value)
        self.tail = (self.tail + [value])[-20:]
        dt = time.perf_counter() - now
        self.step_time = dt if self.step <= 2 or self.step_time is None else 0.8 * self.step_time + 0.2 * dt

    def loop(self, should_stop: Callable[[], bool] | None) -> None:
        """Train until the budget is spent or `should_stop()` says so; evaluate and report when due."""
        self.model.train()
        while True:
            now = time.perf_counter()
            if self.out_of_budget(now):
                break
            if should_stop is not None and should_stop():
                self.cancelled = True
                break
            self.train_step(now)
            if self.val_batches is not None and self.step % self.config.eval_every == 0:
                self.run_eval()
                self.report(time.perf_counter())
            elif time.perf_counter() - self.last_report >= PROGRESS_INTERVAL_S:
                self.report(time.perf_counter())

    def finish(self) -> None:
        """Unless cancelled: the final evaluation (unless just done) and the final report."""
        if self.cancelled:
            return
        h = self.history
        if self.step > 0 and self.val_batches is not None and (not h or h[-1][0] != self.step):
            self.run_eval()
        self.report(time.perf_counter(), done=True)

    def result(self) -> TrainResult:
        """The TrainResult of the run."""
        tail = self.tail
        return TrainResult(steps=self.step, tokens=self.tokens, elapsed_s=time.perf_counter() - self.t0,
                           final_train_loss=sum(tail) / len(tail) if tail else float("nan"),
                           final_val_loss=self.history[-1][1] if self.history else None,
                           val_history=self.history, cancelled=self.cancelled)
