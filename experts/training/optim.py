"""What both training loops share: the device and bf16 checks, autocast, the AdamW optimiser and one update.

Used by :func:`experts.training.lm.train_causal_lm` (token streams) and
:func:`experts.training.examples.train_on_examples` (prompt/completion pairs), so the two loops train
with the same optimiser, clipping and progress cadence.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from experts.training.config import TrainConfig

__all__ = ["PROGRESS_INTERVAL_S", "autocast", "bf16_supported", "load_optimizer_state", "make_optimizer",
           "model_device", "optimizer_step"]

# on_progress is called at most this often (plus after every evaluation and at the end)
PROGRESS_INTERVAL_S = 0.5


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` runs bf16 natively (on CPU: avx512_bf16 or AMX)."""
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return False


def autocast(device: torch.device, enabled: bool) -> Any:
    """bf16 autocast on `device` when `enabled` (a no-op context otherwise)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


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


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: decay on matrices and embeddings only; fused when possible."""
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
    if model_device(model).type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, lr=config.lr, betas=betas, eps=1e-8, fused=True)
        except (RuntimeError, TypeError, ValueError):  # fused unsupported for these parameters
            pass
    return torch.optim.AdamW(groups, lr=config.lr, betas=betas, eps=1e-8)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], config: TrainConfig) -> None:
    """Resume an AdamW made by `make_optimizer` for the same architecture from a saved `state_dict` (its
    moments and step counts; BTM §1.3: an expert resumes the seed's optimizer). The saved groups' betas and
    weight decay are replaced by `config`'s; the learning rate is set by the loop at every step."""
    groups = state.get("param_groups", [])
    if len(groups) != len(optimizer.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(groups, optimizer.param_groups, strict=True)):
        raise ValueError("the optimizer state does not match this model's parameters")
    optimizer.load_state_dict(copy.deepcopy(state))  # never share tensors with the saved state
    betas = (float(config.betas[0]), float(config.betas[1]))
    for group, decay in zip(optimizer.param_groups, (config.weight_decay, 0.0), strict=True):
        group["betas"] = betas
        group["weight_decay"] = decay
