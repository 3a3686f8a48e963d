"""Ray as the scale-out engine for heavy jobs (``MERGEGATE_RUNNER=ray``; the optional ``ray`` extra).

This is the one module that imports ray (inside functions: the gateway starts, and every other runner
works, without ray installed). It knows nothing of BTM or searches; it offers two shapes of work:

* :meth:`RayRunner.map`: ``fn(arg)`` for every arg as independent Ray tasks, at most ``workers`` in
  flight, results in argument order. ``should_stop()`` is polled while waiting: when it turns true the
  tasks still running are cancelled (their worker processes killed) and :class:`JobCancelledError` is
  raised. An exception inside a task is re-raised here as itself (its type and message), not wrapped.
* :meth:`RayRunner.group`: ``n`` actors, each holding one object built once by ``factory(*args)`` in its
  own process (a base model and a LoRA pool loaded once); :meth:`ActorGroup.call` sends one argument to
  every actor and returns their answers in actor order.

Functions, factories and arguments travel by pickle: module-level functions and plain data only. Every
task and actor asks Ray for ``task_cpus`` CPUs and runs torch with that many threads, so its numbers are
those of a single-threaded local run of the same code.

``address``: None starts a local Ray with the machine's CPUs (``num_cpus`` to cap it); ``"auto"`` or
``"ray://host:10001"`` / ``"host:6379"`` joins a running cluster (docs/scaling.md). Ray is started once
per process, on the first job that needs it (a runner without ray installed is refused when it is made, so
the gateway does not start); a Ray already initialised in this process is used as it is.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from experts.errors import ExpertError, JobCancelledError

__all__ = ["ActorGroup", "RayRunner", "RayTaskFailedError", "RayUnavailableError"]

ROOT = str(Path(__file__).resolve().parents[2])  # the checkout holding experts/: local workers import from it
POLL_S = 0.25  # how often a waiting job polls should_stop
_INIT = threading.Lock()  # two jobs starting Ray at once initialise it once


class RayUnavailableError(ExpertError):
    """MERGEGATE_RUNNER=ray without ray installed, or a cluster that cannot be reached."""


class RayTaskFailedError(ExpertError):
    """A Ray task or actor died without a Python exception of its own (a killed worker, a lost node)."""


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise RayUnavailableError("MERGEGATE_RUNNER=ray needs Ray: pip install 'mergegate[ray]'") from e
    return ray


def _threads(n: int) -> None:
    import torch  # heavy: workers import it when they first run something

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _call(fn: Callable[[Any], Any], arg: Any, threads: int) -> Any:
    """The body of every task: `fn(arg)` on `threads` torch threads."""
    _threads(threads)
    return fn(arg)


class _Host:
    """The body of every actor: one object built once, its methods called by name."""

    def __init__(self, factory: Callable[..., Any], args: tuple[Any, ...], threads: int) -> None:
        _threads(threads)
        self.obj = factory(*args)

    def ready(self) -> bool:
        return True

    def call(self, method: str, arg: Any) -> Any:
        return getattr(self.obj, method)(arg)


def _get(ray: Any, ref: Any) -> Any:
    """ray.get, with a task's own exception re-raised as itself (type and message)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise RayTaskFailedError(str(e).strip().splitlines()[-1]) from None
    except ray.exceptions.RayError as e:
        raise RayTaskFailedError(f"a Ray worker failed: {str(e).strip().splitlines()[0]}") from None


class ActorGroup:
    """`n` actors, each holding `factory(*args)` (see the module docstring)."""

    def __init__(self, ray: Any, actors: list[Any]) -> None:
        self._ray, self.actors = ray, actors

    def __len__(self) -> int:
        return len(self.actors)

    def call(self, method: str, args: Sequence[Any]) -> list[Any]:
        """`method(args[i])` on actor i for every i < len(args), in parallel; answers in order."""
        if len(args) > len(self.actors):
            raise ValueError(f"{len(args)} arguments for {len(self.actors)} actors")
        refs = [a.call.remote(method, x) for a, x in zip(self.actors, args, strict=False)]
        return [_get(self._ray, r) for r in refs]

    def close(self) -> None:
        for a in self.actors:
            try:
                self._ray.kill(a)
            except Exception:  # already gone
                pass
        self.actors = []


class RayRunner:
    """Runs tasks and actor groups on a Ray cluster (see the module docstring)."""

    name = "ray"

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, workers: int | None = None,
                 task_cpus: int = 1) -> None:
        if importlib.util.find_spec("ray") is None:  # refuse at start-up, not at the first job
            raise RayUnavailableError("MERGEGATE_RUNNER=ray needs Ray: pip install 'mergegate[ray]'")
        self.address, self.num_cpus, self._workers, self.task_cpus = address, num_cpus, workers, task_cpus

    def start(self) -> Any:
        """Initialise Ray in this process (once); returns the ray module."""
        ray = _ray()
        with _INIT:
            if not ray.is_initialized():
                self._init(ray)
        return ray

    def _init(self, ray: Any) -> None:
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
        try:
            if self.address:
                ray.init(address=self.address, **kw)
            else:
                path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
                ray.init(num_cpus=self.num_cpus, runtime_env={"env_vars": {"PYTHONPATH": path}}, **kw)
        except (ConnectionError, RuntimeError) as e:
            raise RayUnavailableError(f"cannot start or join Ray at {self.address or 'a local cluster'}: {e}") from e

    @property
    def workers(self) -> int:
        """Tasks or actors a job uses at once: as configured, else the cluster's CPUs / task_cpus."""
        if self._workers:
            return self._workers
        cpus = int(self.start().cluster_resources().get("CPU", 1))
        return max(1, cpus // self.task_cpus)

    def map(self, fn: Callable[[Any], Any], args: Sequence[Any], *, should_stop: Callable[[], bool] | None = None,
            on_done: Callable[[int, Any], None] | None = None) -> list[Any]:
        """`[fn(a) for a in args]` as Ray tasks, at most `workers` running; `on_done(i, result)` as each ends."""
        ray = self.start()
        remote = ray.remote(num_cpus=self.task_cpus, max_retries=0)(_call)
        limit, results = self.workers, [None] * len(args)
        todo, running = list(range(len(args))), {}
        try:
            while todo or running:
                if should_stop is not None and should_stop():
                    raise JobCancelledError("cancelled while Ray tasks were running")
                while todo and len(running) < limit:
                    i = todo.pop(0)
                    running[remote.remote(fn, args[i], self.task_cpus)] = i
                done, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
                for ref in done:
                    i = running.pop(ref)
                    results[i] = _get(ray, ref)
                    if on_done is not None:
                        on_done(i, results[i])
        finally:
            for ref in running:  # a cancel, or another task's error: stop the rest (kills their workers)
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # already finished
                    pass
        return results

    def group(self, factory: Callable[..., Any], args: tuple[Any, ...], n: int) -> ActorGroup:
        """`n` actors each holding `factory(*args)`, built in parallel; returns once all are ready."""
        ray = self.start()
        host = ray.remote(num_cpus=self.task_cpus, max_restarts=0, max_task_retries=0)(_Host)
        group = ActorGroup(ray, [host.remote(factory, args, self.task_cpus) for _ in range(n)])
        try:
            for a in group.actors:
                _get(ray, a.ready.remote())
        except BaseException:
            group.close()
            raise
        return group
