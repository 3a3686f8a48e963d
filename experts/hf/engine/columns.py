"""Column and row copies shared by the engine's caches: joining parts right-aligned, writing rows in place."""

from __future__ import annotations

from collections.abc import Sequence

import torch

ROOM = 32  # spare columns of a cache rebuilt by a selection or a join (decode steps before it must grow)


def joined(parts: Sequence[tuple[torch.Tensor, int]], row_dim: int, seq_dim: int, room: int) -> torch.Tensor:
    """The parts' rows stacked along `row_dim`, each right-aligned on `seq_dim` after its left padding (zeros:
    masked columns must hold finite values), in one new buffer with `room` spare columns on the right."""
    first, pad0 = parts[0]
    n = first.shape[seq_dim] + pad0
    shape = list(first.shape)
    shape[row_dim] = sum(t.shape[row_dim] for t, _ in parts)
    shape[seq_dim] = n + room
    out = first.new_empty(shape)
    r = 0
    for t, pad in parts:
        if t.shape[seq_dim] + pad != n:
            raise ValueError(f"widths differ: {t.shape[seq_dim]} + {pad} != {n}")
        rows = out.narrow(row_dim, r, t.shape[row_dim])
        if pad:
            rows.narrow(seq_dim, 0, pad).zero_()
        rows.narrow(seq_dim, pad, t.shape[seq_dim]).copy_(t)
        r += t.shape[row_dim]
    return out


def place_rows(dst: torch.Tensor, slots: torch.Tensor, src: torch.Tensor, pad: int, row_dim: int, seq_dim: int) -> None:
    """In place: rows `slots` (on `row_dim`) of `dst` become `pad` zero columns then `src` (on `seq_dim`)."""
    if dst.shape[seq_dim] != pad + src.shape[seq_dim]:
        raise ValueError(f"widths differ: {dst.shape[seq_dim]} != {pad} + {src.shape[seq_dim]}")
    lead = (slice(None),) * row_dim
    if pad:
        dst.narrow(seq_dim, 0, pad)[(*lead, slots)] = 0
    dst.narrow(seq_dim, pad, src.shape[seq_dim])[(*lead, slots)] = src
