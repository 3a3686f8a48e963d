"""Freed memory goes back to the OS once the engine is idle (experts.hf.engine.heap)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from experts.hf.engine.heap import HeapTrimmer, _glibc_trim
from tests.helpers import FakeClock


def test_one_trim_per_idle_period_after_the_idle_delay():
    calls: list[int] = []
    clock = FakeClock()
    heap = HeapTrimmer(trim=lambda pad: calls.append(pad) or 1, after_idle_s=1.0, clock=clock)
    assert heap.due_in() == float("inf") and not heap.run_if_due()  # never busy: nothing to give back
    heap.busy()
    heap.idle()
    assert heap.due_in() == 1.0 and not heap.run_if_due()
    clock.t += 0.6
    heap.idle()  # still the same idle period: its start does not move
    assert heap.due_in() == pytest.approx(0.4)
    heap.busy()  # work came back before the delay: no trim
    clock.t += 5
    assert heap.due_in() == float("inf") and not heap.run_if_due() and calls == []
    heap.idle()
    clock.t += 1.0
    assert heap.run_if_due() and calls == [0] and heap.trims == 1
    clock.t += 10
    heap.idle()
    assert not heap.run_if_due() and heap.due_in() == float("inf")  # one trim per idle period
    heap.busy()
    heap.idle()
    clock.t += 1.0
    assert heap.run_if_due() and heap.trims == 2


def test_without_malloc_trim_nothing_is_due():
    heap = HeapTrimmer(trim=None, after_idle_s=0.0)
    heap._trim = None  # a C library without malloc_trim (musl, macOS)
    heap.busy()
    heap.idle()
    assert not heap.available and heap.due_in() == float("inf") and not heap.run_if_due()


@pytest.mark.skipif(_glibc_trim() is None, reason="glibc's malloc_trim is not available")
def test_malloc_trim_hands_back_free_chunks_between_live_ones():
    # in a fresh interpreter: 200 1-MB tensors from the heap, every tenth kept alive, the rest freed; glibc keeps
    # the freed chunks (they lie between live ones) until the trim returns their pages
    script = textwrap.dedent("""
        import gc, torch
        from pathlib import Path
        from experts.hf.engine.heap import _glibc_trim
        def rss():
            line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
            return int(line.split()[1]) * 1024
        big = torch.ones(8 << 18); del big  # an 8 MB chunk freed: glibc's mmap threshold rises past 1 MB
        xs = [torch.ones(1 << 18) for _ in range(200)]
        keep = xs[::10]; del xs; gc.collect()
        before = rss()
        _glibc_trim()(0)
        print(before - rss(), sum(t.numel() for t in keep))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    freed, kept = (int(x) for x in out.stdout.split())
    assert kept == 20 * (1 << 18)  # the live tensors are untouched
    assert freed > 100 * (1 << 20), out.stdout  # most of the 180 MB freed
