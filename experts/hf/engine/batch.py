"""The state of one model's batch: its limits, the prompts being prefilled, the rows decoding."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from experts.hf.engine.choices import Group


@dataclass
class Limits:
    """Batch limits of one model (settings `MERGEGATE_MAX_BATCH_SIZE`, `..._MAX_BATCHED_TOKENS`, `..._MAX_QUEUE`)."""

    max_batch_size: int = 64  # rows (choices) decoding at once
    max_batched_tokens: int = 1024  # tokens through the model per step: decoding rows + the prefill chunk
    max_queue: int = 256  # prompts waiting for a place; beyond it, submissions are refused (429)
    max_prefill_padded: int = 8192  # prefill batch size x longest prompt (padding included)
    # Waiting prompts are admitted together (one prefill forward for many prompts costs far less than one
    # each). While rows decode: when the waiting rows are at least `admit_ratio` x the decoding rows, or the
    # oldest has waited `max_wait_s` (TGI's waiting_served_ratio and max_waiting_tokens, in spirit). With an
    # empty batch: after `admit_window_s`, so that a burst of arrivals is prefilled as one batch.
    admit_ratio: float = 0.25
    max_wait_s: float = 0.08
    admit_window_s: float = 0.0  # the gateway: MERGEGATE_ADMIT_WINDOW_MS (0 by default)
    gpt2_kernel: bool = True  # plain GPT-2s run on the engine's own kernel (experts.hf.engine.gpt2)


@dataclass
class Prefill:
    """Prompts being prefilled together, left-padded to the longest; one chunk of columns per step."""

    groups: list[Group]
    ids: torch.Tensor  # [b, P]
    mask: torch.Tensor  # [b, P]
    positions: torch.Tensor  # [b, P]
    offsets: list[int]  # padding columns on the left of each row
    done: int = 0  # columns fed so far
    cache: Any = None
    last: torch.Tensor | None = None  # [b, V] logits after the last column


@dataclass
class Running:
    """Rows decoding together. `lanes[i]` is (group, choice) of row i, or None for a row that has left
    but still holds its place: removing a row copies the whole cache, so a few leavers stay as holes
    (computed, never read) until a joining row takes the place or they are too many (`layout.keep`)."""

    cache: Any
    mask: torch.Tensor | None  # [B, width]; None while no row is padded (all ones)
    width: int  # columns: the cache's plus the one fed next
    lengths: torch.Tensor  # [B] real tokens in the cache (the position of the token fed next)
    next_ids: torch.Tensor  # [B] the token each row feeds next
    lanes: list[tuple[Group, int] | None] = field(default_factory=list)
    holes: int = 0  # lanes that are None
    hole_adapters: dict[int, Any] = field(default_factory=dict)  # a hole keeps its LoRA rows (no rebinding)

    @property
    def live(self) -> int:
        return len(self.lanes) - self.holes

    def full_mask(self) -> torch.Tensor:
        return self.mask if self.mask is not None else torch.ones(len(self.lanes), self.width, dtype=torch.long)


@dataclass
class StepStats:
    prefill_tokens: int = 0
    decode_rows: int = 0
    generated: int = 0


def pad_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    return mask if n <= 0 else torch.cat([mask.new_zeros(mask.shape[0], n), mask], dim=1)
