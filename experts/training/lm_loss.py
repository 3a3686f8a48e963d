"""Next-token loss on token streams: the batch loss the causal-LM loop trains on (`token_ce`), the check of
a stream (`check_stream`) and the matching deterministic validation loss (`evaluate_loss`).

Used by :func:`experts.training.lm.train_causal_lm` (which re-exports `evaluate_loss`) and the LoRA loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from experts.training.optim import autocast, bf16_supported, model_device

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

__all__ = ["check_stream", "evaluate_loss", "token_ce"]


def check_stream(ids: torch.Tensor, name: str) -> torch.Tensor:
    """`ids` as a 1-D int64 tensor; ValueError when it is not a 1-D tensor of integer ids."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of token ids")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{name} must hold integer token ids, got {ids.dtype}")
    return ids.long()


def token_ce(model: Any, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy (fp32) of `model` on inputs `x` against targets `y`."""
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction=reduction)


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
    ids = check_stream(ids, "ids")
    if seq_len <= 0 or batch_size <= 0:
        raise ValueError("seq_len and batch_size must be positive")
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError("max_tokens must be positive")
    n_pred = ids.numel() - 1
    if n_pred < 1:
        raise ValueError("need at least 2 tokens to evaluate")
    if max_tokens is not None:
        n_pred = min(n_pred, max_tokens)
    device = model_device(model)
    ids = ids[: n_pred + 1].to(device)
    use_bf16 = bf16 and bf16_supported(device)
    n_full, rest = divmod(n_pred, seq_len)

    was_training = model.training
    model.eval()
    try:
        total = torch.zeros((), dtype=torch.float64, device=device)
        with autocast(device, use_bf16):
            if n_full:
                windows = ids[: n_full * seq_len + 1]
                x_all = windows[:-1].view(n_full, seq_len)
                y_all = windows[1:].view(n_full, seq_len)
                for i in range(0, n_full, batch_size):
                    total += token_ce(
                        model, x_all[i : i + batch_size], y_all[i : i + batch_size], "sum"
                    ).double()
            if rest:
                start = n_full * seq_len
                x = ids[start : start + rest].unsqueeze(0)
                y = ids[start + 1 : start + rest + 1].unsqueeze(0)
                total += token_ce(model, x, y, "sum").double()
        return float(total.item() / n_pred)
    finally:
        model.train(was_training)
