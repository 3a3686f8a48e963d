"""Which threads may use every core for torch, and which use one.

libgomp, the OpenMP runtime of torch's CPU wheels, gives every thread that runs a parallel torch op a
team of worker threads of its own, kept for as long as that thread lives. Once the process holds more
OpenMP threads than cores, libgomp stops spinning between parallel regions (its "throttled" spin count)
and every op of every team pays a futex wake-up. Measured on the 2-core machine: one idle second team
made a loop of 64x256 matmuls 1.2-1.3x slower, and a job thread that had registered an expert made each
single request through the engine about 1.3x slower for the rest of the process's life
(docs/engine.md, "Threads"). So:

* the engine thread owns the cores (`own_cores()` when it starts);
* a job runs in a thread that also owns the cores and ends when no job is left to run
  (experts.repository.jobs), so its team ends with it;
* every other thread runs torch on one core: the event loop's blocking calls go through `run_sync`
  below, which never creates a team.

`torch.set_num_threads` sets the calling thread's OpenMP and MKL thread counts and the default of
threads that have not used torch yet; that default is why the threads that own the cores say so
explicitly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import anyio.to_thread
import torch

T = TypeVar("T")

CORES = torch.get_num_threads()  # torch's default at start-up (OMP_NUM_THREADS, else the cores it may use)
_local = threading.local()


def own_cores(n: int | None = None) -> None:
    """This thread's torch ops use `n` threads (default: all of `CORES`)."""
    _set(n or CORES)


def _set(n: int) -> None:
    if getattr(_local, "threads", None) != n:
        torch.set_num_threads(n)
        _local.threads = n


def on_one_core(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` with this thread's torch ops on the thread alone (no OpenMP team is created for it)."""
    _set(1)
    return fn(*args)


async def run_sync(fn: Callable[..., T], *args: Any) -> T:
    """anyio's `run_sync` (a worker thread, off the event loop) with torch on one core in that worker."""
    return await anyio.to_thread.run_sync(partial(on_one_core, fn, *args))
