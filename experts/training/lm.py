"""Causal-LM training for experts: a small, fast, seeded loop on a 1-D token stream.

`train_causal_lm` trains any transformers causal LM (GPT-2 from `experts.training.lm_io.new_gpt2` in
practice) on random windows of a token stream, with AdamW, warm-up then linear (or cosine) decay, gradient
clipping, a token and/or wall-clock budget, periodic validation loss, progress callbacks, cooperative
cancellation and periodic checkpoint callbacks; its steps are the methods of `_StreamRun`. The loss it trains
on and `evaluate_loss`, the matching deterministic validation loss, live in :mod:`experts.training.lm_loss`;
the I/O around it (`new_gpt2`, `save_model_atomic`) in :mod:`experts.training.lm_io`, the optimiser side
shared with the LoRA loop in :mod:`experts.training.optim`. `evaluate_loss`, the I/O and the config values
are re-exported here. Token streams come from :func:`experts.data.tokens.tokenize_text`.

Speed notes (2 CPU cores, measured; see `bench/training.py`): bf16 autocast is a real 1.6x on CPUs with
avx512_bf16; the "eager" attention kernel is about 10% faster than "sdpa" for these small models on CPU, and
fused AdamW about 5-10% faster than the foreach one, so the loop uses both (the model's attention
implementation is restored afterwards). The loss is computed from the logits with `F.cross_entropy` against
the next tokens of each window of `seq_len + 1` tokens (all `seq_len` positions are trained; passing `labels=`
would drop the last one and cost the same).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from experts.training.config import TrainConfig, TrainingCancelled, TrainProgress, TrainResult
from experts.training.lm_io import new_gpt2, save_model_atomic
from experts.training.lm_loss import check_stream, evaluate_loss, token_ce
from experts.training.optim import (
    PROGRESS_INTERVAL_S,
    autocast,
    bf16_supported,
    load_optimizer_state,
    make_optimizer,
    model_device,
    optimizer_step,
)

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

__all__ = ["TrainConfig", "TrainProgress", "TrainResult", "TrainingCancelled", "evaluate_loss", "new_gpt2",
           "optimizer_step", "save_model_atomic", "train_causal_lm"]

logger = logging.getLogger(__name__)

Checkpoint = Callable[["PreTrainedModel", int], None]


# ------------------------------------------------------------------------------------------------------------
# helpers


def _max_positions(model: Any) -> int | None:
    """The model's context length from its config (None when it does not say)."""
    cfg = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ------------------------------------------------------------------------------------------------------------
# training


def train_causal_lm(
    model: PreTrainedModel,
    train_ids: torch.Tensor,
    val_ids: torch.Tensor | None,
    config: TrainConfig,
    *,
    on_progress: Callable[[TrainProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint: Checkpoint | None = None,
    checkpoint_every: int = 0,
    optimizer_state: dict[str, Any] | None = None,
) -> TrainResult:
    """Train `model` in place on random windows of `train_ids` (see `TrainConfig` for budgets and schedule).

    - Batches: `batch_size` windows of `seq_len + 1` tokens at uniformly random offsets, drawn from a
      `torch.Generator` seeded with `config.seed`.
    - `should_stop()` is checked before every step; when it returns True the call returns promptly with
      `cancelled=True` (no final evaluation; `final_val_loss` is the latest periodic one).
    - `on_progress(TrainProgress)` is called at most every 0.5 s, after every evaluation and once at the end.
    - `checkpoint(model, step)` is called every `checkpoint_every` steps (0: never) with the model in train
      mode (it is put back in train mode afterwards); the final model is not checkpointed: the caller saves
      it.
    - The model is left in eval mode, also when a callback raises (the exception propagates).
    - `optimizer_state` (an AdamW `state_dict` from an earlier run of the same model, e.g.
      `TrainResult.optimizer_state`) resumes that run's moments; the config's betas and weight decay apply.
      With `config.start_step` and `config.schedule_span` the call continues that run's schedule (BTM §1.3).
    """
    train_ids, val_ids = _checked_inputs(model, train_ids, val_ids, config, checkpoint_every)
    run = _StreamRun(model, train_ids, val_ids, config, on_progress)
    if optimizer_state is not None:
        load_optimizer_state(run.optimizer, optimizer_state, config)
    try:
        run.loop(should_stop, checkpoint, checkpoint_every)
        run.finish()
    finally:
        run.close()
    return run.result()


def _checked_inputs(model: Any, train_ids: torch.Tensor, val_ids: torch.Tensor | None, config: TrainConfig,
                    checkpoint_every: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Refuse what cannot train (TypeError/ValueError); the streams as int64 tensors."""
    if not isinstance(config, TrainConfig):
        raise TypeError("config must be a TrainConfig")
    if checkpoint_every < 0:
        raise ValueError("checkpoint_every must be >= 0")
    train_ids = check_stream(train_ids, "train_ids")
    if val_ids is not None:
        val_ids = check_stream(val_ids, "val_ids")
        if val_ids.numel() < 2:
            raise ValueError("val_ids must hold at least 2 tokens")
    T = config.seq_len
    if train_ids.numel() < T + 1:
        raise ValueError(f"train_ids has {train_ids.numel()} tokens; need at least seq_len + 1 = {T + 1}")
    max_pos = _max_positions(model)
    if max_pos is not None and T > max_pos:
        raise ValueError(f"seq_len {T} exceeds the model's {max_pos} positions")
    return train_ids, val_ids


def _switch_attention(model: Any, implementation: str | None) -> str | None:
    """Switch the model to `implementation` for training; returns the one to restore (None: nothing to do)."""
    cfg: Any = getattr(model, "config", None)
    if not implementation or getattr(cfg, "_attn_implementation", None) in (None, implementation):
        return None
    try:
        old = cfg._attn_implementation
        model.set_attn_implementation(implementation)
        if cfg._attn_implementation != implementation:  # refused (logged by transformers)
            return None
        return old
    except Exception:
        return None


class _StreamRun:
    """One `train_causal_lm` call: its clock, sampler, optimiser, losses, evaluations and reports."""

    def __init__(self, model: Any, train_ids: torch.Tensor, val_ids: torch.Tensor | None, config: TrainConfig,
                 on_progress: Callable[[TrainProgress], None] | None) -> None:
        """Start the clock, seed the sampler, move the data, switch attention, build the optimiser."""
        self.model, self.val_ids, self.config, self.on_progress = model, val_ids, config, on_progress
        self.t_start = time.perf_counter()
        self.device = model_device(model)
        self.use_bf16 = config.bf16 and bf16_supported(self.device)
        self.tokens_per_step = config.batch_size * config.seq_len
        self.total_steps = (math.ceil(config.max_tokens / self.tokens_per_step)
                            if config.max_tokens is not None else None)
        torch.manual_seed(config.seed)
        self.gen = torch.Generator(device="cpu").manual_seed(config.seed)
        self.data = train_ids.to(self.device)
        self.n_starts = self.data.numel() - config.seq_len  # valid window starts: 0 .. n - (T + 1)
        self.offsets = torch.arange(config.seq_len + 1, device=self.device)
        self.old_attn = _switch_attention(model, config.attn_implementation)
        self.optimizer = make_optimizer(model, config)
        self.val_history: list[tuple[int, float]] = []
        self.recent_losses: list[torch.Tensor] = []  # losses since the last progress report (detached)
        self.tail_losses: list[torch.Tensor] = []  # last <= 20 losses, for final_train_loss
        self.step = 0
        self.lr = config.run_lr(0, 0.0)
        self.cancelled = False
        self.last_report = self.t_start
        self.reported = (-1, 0)  # (step, number of evaluations) of the latest report
        self.step_time: float | None = None  # EMA of the duration of one step (s)
        self.eval_time: float | None = None  # duration of the latest evaluation (s)

    def fraction(self, now: float) -> float:
        """How much of the budget is spent: the larger of the step and time fractions, at most 1."""
        f = 0.0
        if self.total_steps is not None:
            f = max(f, self.step / self.total_steps)
        if self.config.max_seconds is not None:
            f = max(f, (now - self.t_start) / self.config.max_seconds)
        return min(f, 1.0)

    def _train_loss(self) -> float:
        """Mean loss since the previous report (else the latest loss; nan before the first step)."""
        if self.recent_losses:
            return float(torch.stack(self.recent_losses).float().mean().item())
        if self.tail_losses:
            return float(self.tail_losses[-1].item())
        return float("nan")

    def _eta(self, elapsed: float, done: bool) -> float | None:
        """Seconds left: 0 when done, None before the first step, else the sooner of the two budgets' ends."""
        if done:
            return 0.0
        if self.step == 0:
            return None
        etas = []
        if self.total_steps is not None:
            etas.append(max(0.0, elapsed * (self.total_steps - self.step) / self.step))
        if self.config.max_seconds is not None:
            etas.append(max(0.0, self.config.max_seconds - elapsed))
        return min(etas)

    def report(self, now: float, force_val: float | None = None, done: bool = False) -> None:
        """Send one TrainProgress (without a listener, only forget the recent losses)."""
        if self.on_progress is None:
            self.recent_losses = []
            return
        self.reported = (self.step, len(self.val_history))
        elapsed = now - self.t_start
        train_loss = self._train_loss()
        self.recent_losses = []
        val = force_val if force_val is not None else (self.val_history[-1][1] if self.val_history else None)
        tokens = self.step * self.tokens_per_step
        self.on_progress(TrainProgress(
            step=self.step, tokens=tokens, elapsed_s=elapsed,
            tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0, train_loss=train_loss, val_loss=val,
            lr=self.lr, fraction=1.0 if done else self.fraction(now), eta_s=self._eta(elapsed, done),
        ))
        self.last_report = time.perf_counter()

    def run_eval(self) -> float:
        """Validation loss now (timed, for the time budget), appended to the history."""
        assert self.val_ids is not None
        t0 = time.perf_counter()
        c = self.config
        loss = evaluate_loss(self.model, self.val_ids, seq_len=c.seq_len, max_tokens=c.eval_tokens,
                             batch_size=c.batch_size, bf16=self.use_bf16)
        self.eval_time = time.perf_counter() - t0
        self.val_history.append((self.step, loss))
        return loss

    def final_eval_estimate(self) -> float:
        """Predicted duration of the final evaluation (s), for the time budget."""
        if self.val_ids is None:
            return 0.0
        if self.eval_time is not None:
            return self.eval_time
        if self.step_time is None:
            return 0.0
        # a forward pass costs about a third of a training step per token
        n_eval = min(self.config.eval_tokens, self.val_ids.numel())
        return self.step_time * n_eval / self.tokens_per_step / 3.0

    def out_of_budget(self, now: float) -> bool:
        """True when the token budget is spent, or the next step (plus the final evaluation) would overrun
        the time budget (never before the first step)."""
        if self.total_steps is not None and self.step >= self.total_steps:
            return True
        if self.config.max_seconds is not None and self.step > 0:
            predicted_end = now - self.t_start + (self.step_time or 0.0) + self.final_eval_estimate()
            return predicted_end > self.config.max_seconds
        return False

    def train_step(self, t_step: float) -> float:
        """One optimiser step on a random batch of windows; returns the time it ended."""
        B, c = self.config.batch_size, self.config
        self.lr = c.run_lr(self.step, self.fraction(t_step))
        starts = torch.randint(0, self.n_starts, (B,), generator=self.gen).to(self.device)
        window = self.data[starts.unsqueeze(1) + self.offsets]
        x, y = window[:, :-1], window[:, 1:]
        with autocast(self.device, self.use_bf16):
            loss = token_ce(self.model, x, y)
        optimizer_step(self.model, self.optimizer, loss, lr=self.lr, grad_clip=c.grad_clip)
        self.step += 1
        detached = loss.detach()
        self.recent_losses.append(detached)
        self.tail_losses.append(detached)
        if len(self.tail_losses) > 20:
            del self.tail_losses[0]
        now = time.perf_counter()
        dt = now - t_step
        # EMA of the step time; the second step replaces the first, which carries one-time costs
        self.step_time = dt if self.step <= 2 or self.step_time is None else 0.8 * self.step_time + 0.2 * dt
        return now

    def after_step(self, now: float, checkpoint: Checkpoint | None, checkpoint_every: int) -> None:
        """Checkpoint, evaluate and report when due."""
        if checkpoint is not None and checkpoint_every > 0 and self.step % checkpoint_every == 0:
            checkpoint(self.model, self.step)
            self.model.train()
        if self.val_ids is not None and self.step % self.config.eval_every == 0:
            val = self.run_eval()
            self.report(time.perf_counter(), force_val=val)
        elif now - self.last_report >= PROGRESS_INTERVAL_S:
            self.report(now)

    def loop(self, should_stop: Callable[[], bool] | None, checkpoint: Checkpoint | None,
             checkpoint_every: int) -> None:
        """Train until the budget is spent or `should_stop()` says so."""
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        while True:
            now = time.perf_counter()
            if self.out_of_budget(now):
                break
            if should_stop is not None and should_stop():
                self.cancelled = True
                break
            now = self.train_step(now)
            self.after_step(now, checkpoint, checkpoint_every)

    def finish(self) -> None:
        """The final evaluation (unless cancelled or just done) and the final report (unless the latest one
        said it all)."""
        v, step = self.val_history, self.step
        if not self.cancelled and self.val_ids is not None and step > 0 and (not v or v[-1][0] != step):
            self.run_eval()
        finished = not self.cancelled
        said_it_all = self.reported == (self.step, len(self.val_history))
        if not said_it_all or (finished and self.config.max_seconds is not None):
            self.report(time.perf_counter(), done=finished)

    def close(self) -> None:
        """Leave the model in eval mode without gradients, with its own attention implementation."""
        self.model.zero_grad(set_to_none=True)
        self.model.eval()
        if self.old_attn is not None:
            try:
                self.model.set_attn_implementation(self.old_attn)
            except Exception:
                logger.warning("could not restore attention implementation %r", self.old_attn, exc_info=True)

    def result(self) -> TrainResult:
        """The TrainResult of the run."""
        elapsed = time.perf_counter() - self.t_start
        tail = self.tail_losses
        final_train = float(torch.stack(tail).float().mean().item()) if tail else float("nan")
        return TrainResult(steps=self.step, tokens=self.step * self.tokens_per_step, elapsed_s=elapsed,
                           final_train_loss=final_train,
                           final_val_loss=self.val_history[-1][1] if self.val_history else None,
                           val_history=self.val_history, cancelled=self.cancelled,
                           optimizer_state=self.optimizer.state_dict())
