"""How rows enter and leave a running batch (the cache's row layout; experts.hf.engine.kv has the column one).

Rows that finish stay as holes while holes are at most a quarter of the batch: removing a row copies every
other row's cache, a hole costs only its share of a decode step. Rows that join take the holes' places
(their cache written over those rows, nobody else's copied); what does not fit is appended, after one
compaction. Columns that only departed rows used are trimmed once there are enough of them.
"""

from __future__ import annotations

from typing import Any

import torch

from experts.hf.engine.batch import Running, pad_mask
from experts.hf.engine.choices import Group
from experts.hf.engine.kv import BatchAdapter

Lane = tuple[Group, int]
MIN_TRIM = 16  # leading all-padding columns worth a copy of the cache to drop


def join(adapter: BatchAdapter, r: Running | None, cache: Any, mask: torch.Tensor, lengths: torch.Tensor,
         next_ids: torch.Tensor, lanes: list[Lane]) -> Running:
    """The batch with prefilled rows added (`mask` [b, width] counts each row's first sampled token)."""
    if r is None:
        return Running(cache, None if bool(mask.all()) else mask, mask.shape[1], lengths, next_ids, list(lanes))
    if r.holes and mask.shape[1] <= r.width:
        k = min(r.holes, len(lanes))
        if k == len(lanes):
            _place(adapter, r, cache, mask, lengths, next_ids, lanes)
            return r
        head, rest = torch.arange(k), torch.arange(k, len(lanes))
        _place(adapter, r, adapter.select(cache, head), mask[:k], lengths[:k], next_ids[:k], lanes[:k])
        cache, mask, lengths, next_ids, lanes = (adapter.select(cache, rest), mask[k:], lengths[k:], next_ids[k:],
                                                 lanes[k:])
    if r.holes:
        _compact(adapter, r, [i for i, lane in enumerate(r.lanes) if lane is not None])
    la, lb = r.width, mask.shape[1]
    width = max(la, lb)
    r.cache = adapter.join(r.cache, width - la, cache, width - lb)
    if r.mask is not None or la != lb or not bool(mask.all()):
        r.mask = torch.cat([pad_mask(r.full_mask(), width - la), pad_mask(mask, width - lb)])
    r.width = width
    r.lengths = torch.cat([r.lengths, lengths])
    r.next_ids = torch.cat([r.next_ids, next_ids])
    r.lanes = r.lanes + list(lanes)
    return r


def keep(adapter: BatchAdapter, r: Running, rows: list[int]) -> Running | None:
    """The batch with only rows `rows` live (None when none is): the others become holes while holes are at most
    a quarter of the batch; beyond that, one compaction removes them all."""
    if len(rows) == r.live:
        return r
    if not rows:
        return None
    if len(r.lanes) - len(rows) <= len(r.lanes) // 4:
        kept = set(rows)
        for i, lane in enumerate(r.lanes):
            if lane is not None and i not in kept:
                r.hole_adapters[i] = lane[0].request.adapter  # the LoRA binding stays the same
        r.lanes = [lane if i in kept else None for i, lane in enumerate(r.lanes)]
        r.holes = len(r.lanes) - len(rows)
        return r
    _compact(adapter, r, rows)
    return r


def _place(adapter: BatchAdapter, r: Running, cache: Any, mask: torch.Tensor, lengths: torch.Tensor,
           next_ids: torch.Tensor, lanes: list[Lane]) -> None:
    """Joining rows written into holes (at least as many holes as rows; rows no wider than the batch)."""
    slots = [i for i, lane in enumerate(r.lanes) if lane is None][:len(lanes)]
    idx = torch.tensor(slots)
    pad = r.width - mask.shape[1]
    r.cache = adapter.place(r.cache, idx, cache, pad)
    r.mask = r.mask.clone() if r.mask is not None else r.full_mask()  # a row's mask changes in place below
    r.mask[idx] = pad_mask(mask, pad)
    r.lengths, r.next_ids = r.lengths.clone(), r.next_ids.clone()
    r.lengths[idx], r.next_ids[idx] = lengths, next_ids
    for i, lane in zip(slots, lanes, strict=True):
        r.lanes[i] = lane
        r.hole_adapters.pop(i, None)
    r.holes -= len(slots)
    _trim(adapter, r, MIN_TRIM)


def _compact(adapter: BatchAdapter, r: Running, rows: list[int]) -> None:
    """Rows `rows` only, holes gone: one selection of the cache; columns that are padding in every row go."""
    r.holes = 0
    r.hole_adapters = {}
    if len(rows) == len(r.lanes):
        return
    idx = torch.tensor(rows)
    r.cache = adapter.select(r.cache, idx)
    r.lengths, r.next_ids = r.lengths[idx], r.next_ids[idx]
    r.lanes = [r.lanes[i] for i in rows]
    if r.mask is not None:
        r.mask = r.mask[idx]
        _trim(adapter, r, 1)


def _trim(adapter: BatchAdapter, r: Running, min_lead: int) -> None:
    """Drop the leading columns that are padding in every row, when there are at least `min_lead`."""
    if r.mask is None:
        return
    lead = int((r.mask.cumsum(1) == 0).all(0).sum())
    if lead >= min_lead:
        r.cache = adapter.trim_left(r.cache, lead)
        r.mask = r.mask[:, lead:]
        r.width -= lead
    if bool(r.mask.all()):
        r.mask = None
