"""Job worker threads: at most `workers` at once, and none outlives the queue (its OpenMP team ends with it)."""

import threading

import torch

from experts.hf.threads import CORES
from experts.repository.jobs import JobThreads
from tests.helpers import wait_until


def test_job_threads_run_everything_at_most_workers_at_once_and_then_end():
    pool = JobThreads(2, "t-job")
    lock = threading.Lock()
    running, peak, done, threads = [0], [0], [], []
    release = threading.Event()

    def job(i: int) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            threads.append((threading.current_thread().name, torch.get_num_threads()))
        release.wait(10)
        with lock:
            running[0] -= 1
            done.append(i)

    for i in range(5):
        pool.submit(lambda i=i: job(i))
    assert wait_until(lambda: running[0] == 2)
    release.set()
    assert wait_until(lambda: len(done) == 5)
    assert sorted(done) == [0, 1, 2, 3, 4]
    assert peak[0] == 2
    assert all(n == CORES for _, n in threads)  # a job owns the cores
    assert wait_until(lambda: not any(t.name.startswith("t-job") for t in threading.enumerate()))


def test_shutdown_drops_queued_jobs_and_waits_for_running_ones():
    pool = JobThreads(1, "t-stop")
    started, release, ran = threading.Event(), threading.Event(), []

    def first() -> None:
        started.set()
        release.wait(10)
        ran.append("first")

    pool.submit(first)
    pool.submit(lambda: ran.append("second"))
    assert started.wait(10)
    threading.Timer(0.2, release.set).start()
    pool.shutdown()
    assert ran == ["first"]
    try:
        pool.submit(lambda: None)
    except RuntimeError:
        pass
    else:
        raise AssertionError("a shut-down pool accepted a job")
