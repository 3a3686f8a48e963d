"""The torch thread rule: side threads run torch on one core, the threads that own the cores say so."""

import threading

import anyio
import torch

from experts.hf.threads import CORES, own_cores, run_sync


def test_run_sync_runs_torch_on_one_core_in_its_worker():
    seen: list[tuple[int, str]] = []

    def work() -> float:
        seen.append((torch.get_num_threads(), threading.current_thread().name))
        return float(torch.ones(4, 4).sum())

    assert anyio.run(run_sync, work) == 16.0
    threads, name = seen[0]
    assert threads == 1
    assert name != threading.main_thread().name


def test_own_cores_gives_a_thread_every_core_whatever_the_default():
    torch_default = torch.get_num_threads()
    got: list[int] = []

    def side_then_owner() -> None:
        anyio.run(run_sync, lambda: None)  # a side thread has set the default for new threads to 1
        t = threading.Thread(target=lambda: (own_cores(), got.append(torch.get_num_threads())))
        t.start()
        t.join()

    side_then_owner()
    assert got == [CORES]
    assert torch.get_num_threads() == torch_default  # the calling thread keeps its own setting
