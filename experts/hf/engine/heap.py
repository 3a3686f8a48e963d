"""Freed memory handed back to the OS when the engine goes idle.

Every step allocates and frees activations, KV buffers and the LoRA rows' gathered factors: a few hundred KB
to a few MB each. glibc keeps freed chunks in its arenas, and its mmap threshold rises to the largest chunk
freed so far, so after the first large step those buffers come from the heap too. The process then keeps its
peak size after a burst is over: in `bench/multi_lora.py`, 20 adapters served left the resident size 40 MB
above the bytes the gateway holds. `malloc_trim(0)` returns the free pages of every arena. The engine calls
it once it has been idle for a second (no model with anything to do), so traffic never pays for it, not even
the short gaps between one client's requests.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

AFTER_IDLE_S = 1.0  # idle this long before the free heap is handed back: a short gap between requests is not idle


def _glibc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


class HeapTrimmer:
    """One trim per idle period: `idle()` when the engine has nothing to do, `busy()` when it has; the trim is
    due `after_idle_s` after the period began (`due_in`), and `run_if_due` runs it."""

    def __init__(self, trim: Callable[[int], int] | None = None, after_idle_s: float = AFTER_IDLE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._trim = trim if trim is not None else _glibc_trim()
        self.after_idle_s = after_idle_s
        self._clock = clock
        self._since: float | None = None  # when the current idle period began (None: busy, or trimmed already)
        self._busy = False
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def busy(self) -> None:
        self._busy, self._since = True, None

    def idle(self) -> None:
        if self._busy:  # the first idle moment after work: start the period (a trimmed period stays trimmed)
            self._busy, self._since = False, self._clock()

    def due_in(self) -> float:
        """Seconds until the trim of this idle period is due (inf: none is pending)."""
        if self._since is None or self._trim is None:
            return float("inf")
        return max(0.0, self._since + self.after_idle_s - self._clock())

    def run_if_due(self) -> bool:
        """Trim now if this idle period's trim is due; True when memory was handed back."""
        if self.due_in() > 0:
            return False
        self._since = None
        try:
            self._trim(0)  # type: ignore[misc]
        except Exception:  # pragma: no cover - a C call that should not fail; never take the engine down
            log.exception("malloc_trim failed")
            self._trim = None
            return False
        self.trims += 1
        return True
