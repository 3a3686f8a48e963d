"""Causal-LM training for experts: a small, fast, seeded loop on a 1-D token stream.

`train_causal_lm` trains any transformers causal LM (GPT-2 from `experts.training.lm_io.new_gpt2` in practice) on random windows of a
token stream, with AdamW, warm-up then linear (or cosine) decay, gradient clipping, a token and/or wall-clock
budget, periodic validation loss, progress callbacks, cooperative cancellation and periodic checkpoint
callbacks. `evaluate_loss` is the matching deterministic validation loss. The I/O around it (`tokenize_text`,
`new_gpt2`, `save_model_atomic`) lives in :mod:`experts.training.lm_io` and is re-exported here.

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
import torch.nn.functional as F

from experts.training.lm_io import new_gpt2, save_model_atomic, tokenize_text
from experts.training.config import TrainConfig, TrainingCancelled, TrainProgress, TrainResult

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

__all__ = [
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
    "TrainingCancelled",
    "evaluate_loss",
    "new_gpt2",
    "save_model_atomic",
    "tokenize_text",
    "train_causal_lm",
]

logger = logging.getLogger(__name__)

# on_progress is called at most this often (plus after every evaluation and at the end)
PROGRESS_INTERVAL_S = 0.5


# ------------------------------------------------------------------------------------------------------------
# helpers


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return False


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _max_positions(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_stream(ids: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of token ids")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{name} must hold integer token ids, got {ids.dtype}")
    return ids.long()


def _token_ce(model: Any, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction=reduction)


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, *, lr: float,
                   grad_clip: float) -> None:
    """One update: backward, clip the gradient norm (if grad_clip > 0), step at `lr`, clear the gradients."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():  # shared (tied) parameters are listed once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    betas = (float(config.betas[0]), float(config.betas[1]))
    if _model_device(model).type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, lr=config.lr, betas=betas, eps=1e-8, fused=True)
        except (RuntimeError, TypeError, ValueError):  # fused unsupported for these parameters
            pass
    return torch.optim.AdamW(groups, lr=config.lr, betas=betas, eps=1e-8)


# ------------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate_loss(
    model: PreTrainedModel,
    ids: torch.Tensor,
    *,
    seq_len: int,
    max_tokens: int | None = None,
    batch_size: int = 8,
    bf16: bool = False,
) -> float:
    """Mean next-token cross-entropy (nats/token) of `model` on the token stream `ids`.

    The stream is cut into consecutive windows of `seq_len` predicted tokens (window k feeds
    `ids[k*seq_len : (k+1)*seq_len]` and predicts `ids[k*seq_len+1 : (k+1)*seq_len+1]`), so every predicted
    token is counted once, each with between 0 and seq_len-1 tokens of context; a last shorter window takes
    the rest. `max_tokens` limits the number of predicted tokens (the first ones of the stream). Deterministic
    (no sampling), no gradients, fp32 unless `bf16`; the model's train/eval mode is restored afterwards.
    """
    ids = _check_stream(ids, "ids")
    if seq_len <= 0 or batch_size <= 0:
        raise ValueError("seq_len and batch_size must be positive")
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError("max_tokens must be positive")
    n_pred = ids.numel() - 1
    if n_pred < 1:
        raise ValueError("need at least 2 tokens to evaluate")
    if max_tokens is not None:
        n_pred = min(n_pred, max_tokens)
    device = _model_device(model)
    ids = ids[: n_pred + 1].to(device)
    use_bf16 = bf16 and _bf16_supported(device)
    n_full, rest = divmod(n_pred, seq_len)

    was_training = model.training
    model.eval()
    try:
        total = torch.zeros((), dtype=torch.float64, device=device)
        with _autocast(device, use_bf16):
            if n_full:
                windows = ids[: n_full * seq_len + 1]
                x_all = windows[:-1].view(n_full, seq_len)
                y_all = windows[1:].view(n_full, seq_len)
                for i in range(0, n_full, batch_size):
                    total += _token_ce(
                        model, x_all[i : i + batch_size], y_all[i : i + batch_size], "sum"
                    ).double()
            if rest:
                start = n_full * seq_len
                x = ids[start : start + rest].unsqueeze(0)
                y = ids[start + 1 : start + rest + 1].unsqueeze(0)
                total += _token_ce(model, x, y, "sum").double()
        return float(total.item() / n_pred)
    finally:
        model.train(was_training)


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
    checkpoint: Callable[[PreTrainedModel, int], None] | None = None,
    checkpoint_every: int = 0,
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
    """
    if not isinstance(config, TrainConfig):
        raise TypeError("config must be a TrainConfig")
    if checkpoint_every < 0:
        raise ValueError("checkpoint_every must be >= 0")
    train_ids = _check_stream(train_ids, "train_ids")
    if val_ids is not None:
        val_ids = _check_stream(val_ids, "val_ids")
        if val_ids.numel() < 2:
            raise ValueError("val_ids must hold at least 2 tokens")
    B, T = config.batch_size, config.seq_len
    if train_ids.numel() < T + 1:
        raise ValueError(f"train_ids has {train_ids.numel()} tokens; need at least seq_len + 1 = {T + 1}")
    max_pos = _max_positions(model)
    if max_pos is not None and T > max_pos:
        raise ValueError(f"seq_len {T} exceeds the model's {max_pos} positions")

    t_start = time.perf_counter()
    device = _model_device(model)
    use_bf16 = config.bf16 and _bf16_supported(device)
    tokens_per_step = B * T
    total_steps = math.ceil(config.max_tokens / tokens_per_step) if config.max_tokens is not None else None
    max_seconds = config.max_seconds

    torch.manual_seed(config.seed)
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    data = train_ids.to(device)
    n_starts = data.numel() - T  # valid window starts: 0 .. n - (T + 1)
    offsets = torch.arange(T + 1, device=device)

    old_attn = None
    cfg: Any = getattr(model, "config", None)
    if config.attn_implementation and getattr(cfg, "_attn_implementation", None) not in (
        None,
        config.attn_implementation,
    ):
        try:
            old_attn = cfg._attn_implementation
            model.set_attn_implementation(config.attn_implementation)
            if cfg._attn_implementation != config.attn_implementation:  # refused (logged by transformers)
                old_attn = None
        except Exception:  # noqa: BLE001 - not every model can switch; train with what it has
            old_attn = None

    optimizer = _make_optimizer(model, config)
    eval_tokens = config.eval_tokens
    val_history: list[tuple[int, float]] = []
    recent_losses: list[torch.Tensor] = []  # losses since the last progress report (detached)
    tail_losses: list[torch.Tensor] = []  # last <= 20 losses, for final_train_loss
    step = 0
    lr = config.lr_at(0, 0.0)
    cancelled = False
    last_report = t_start
    reported = (-1, 0)  # (step, number of evaluations) of the latest report
    step_time = None  # EMA of the duration of one step (s)
    eval_time = None  # duration of the latest evaluation (s)

    def fraction_now(now: float) -> float:
        f = 0.0
        if total_steps is not None:
            f = max(f, step / total_steps)
        if max_seconds is not None:
            f = max(f, (now - t_start) / max_seconds)
        return min(f, 1.0)

    def report(now: float, force_val: float | None = None, done: bool = False) -> None:
        nonlocal last_report, recent_losses, reported
        if on_progress is None:
            recent_losses = []
            return
        reported = (step, len(val_history))
        elapsed = now - t_start
        if recent_losses:
            train_loss = float(torch.stack(recent_losses).float().mean().item())
        elif tail_losses:
            train_loss = float(tail_losses[-1].item())
        else:
            train_loss = float("nan")
        recent_losses = []
        frac = 1.0 if done else fraction_now(now)
        eta = 0.0 if done else None
        if step > 0 and not done:
            etas = []
            if total_steps is not None:
                etas.append(max(0.0, elapsed * (total_steps - step) / step))
            if max_seconds is not None:
                etas.append(max(0.0, max_seconds - elapsed))
            eta = min(etas)
        val = force_val if force_val is not None else (val_history[-1][1] if val_history else None)
        tokens = step * tokens_per_step
        on_progress(
            TrainProgress(
                step=step,
                tokens=tokens,
                elapsed_s=elapsed,
                tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
                train_loss=train_loss,
                val_loss=val,
                lr=lr,
                fraction=frac,
                eta_s=eta,
            )
        )
        last_report = time.perf_counter()

    def run_eval() -> float:
        nonlocal eval_time
        assert val_ids is not None
        t0 = time.perf_counter()
        loss = evaluate_loss(model, val_ids, seq_len=T, max_tokens=eval_tokens, batch_size=B, bf16=use_bf16)
        eval_time = time.perf_counter() - t0
        val_history.append((step, loss))
        return loss

    def final_eval_estimate() -> float:
        if val_ids is None:
            return 0.0
        if eval_time is not None:
            return eval_time
        if step_time is None:
            return 0.0
        # a forward pass costs about a third of a training step per token
        return step_time * min(eval_tokens, val_ids.numel()) / tokens_per_step / 3.0

    try:
        model.train()
        model.zero_grad(set_to_none=True)
        while True:
            now = time.perf_counter()
            if total_steps is not None and step >= total_steps:
                break
            if max_seconds is not None and step > 0:
                predicted_end = now - t_start + (step_time or 0.0) + final_eval_estimate()
                if predicted_end > max_seconds:
                    break
            if should_stop is not None and should_stop():
                cancelled = True
                break

            t_step = now
            lr = config.lr_at(step, fraction_now(now))
            starts = torch.randint(0, n_starts, (B,), generator=gen).to(device)
            window = data[starts.unsqueeze(1) + offsets]
            x, y = window[:, :-1], window[:, 1:]
            with _autocast(device, use_bf16):
                loss = _token_ce(model, x, y)
            optimizer_step(model, optimizer, loss, lr=lr, grad_clip=config.grad_clip)
            step += 1

            detached = loss.detach()
            recent_losses.append(detached)
            tail_losses.append(detached)
            if len(tail_losses) > 20:
                del tail_losses[0]
            now = time.perf_counter()
            dt = now - t_step
            # EMA of the step time; the second step replaces the first, which carries one-time costs
            step_time = dt if step <= 2 or step_time is None else 0.8 * step_time + 0.2 * dt

            if checkpoint is not None and checkpoint_every > 0 and step % checkpoint_every == 0:
                checkpoint(model, step)
                model.train()
            if val_ids is not None and step % config.eval_every == 0:
                val = run_eval()
                report(time.perf_counter(), force_val=val)
            elif now - last_report >= PROGRESS_INTERVAL_S:
                report(now)

        if (
            not cancelled
            and val_ids is not None
            and step > 0
            and (not val_history or val_history[-1][0] != step)
        ):
            run_eval()
        finished = not cancelled
        if reported != (step, len(val_history)) or (finished and max_seconds is not None):
            report(time.perf_counter(), done=finished)  # the final report, unless the latest one said it all
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
        if old_attn is not None:
            try:
                model.set_attn_implementation(old_attn)
            except Exception:
                logger.warning("could not restore attention implementation %r", old_attn, exc_info=True)

    elapsed = time.perf_counter() - t_start
    final_train = float(torch.stack(tail_losses).float().mean().item()) if tail_losses else float("nan")
    return TrainResult(
        steps=step,
        tokens=step * tokens_per_step,
        elapsed_s=elapsed,
        final_train_loss=final_train,
        final_val_loss=val_history[-1][1] if val_history else None,
        val_history=val_history,
        cancelled=cancelled,
    )
