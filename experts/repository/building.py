"""Experts a running job will register: until their row exists they are listed as `building` and answer
503 with the job's id instead of 404 (the demo repository is built this way while the gateway serves)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Planned:
    job_id: str
    what: str  # shown in the 503: what the job is building
    kind: str  # the kind the expert will have (local, lora, ensemble)
    since: float = field(default_factory=time.time)


class BuildingSet:
    """Thread-safe map of planned expert ids; the job that plans them clears them when it ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._planned: dict[str, Planned] = {}

    def mark(self, ids: Iterable[tuple[str, str]], job_id: str, what: str) -> None:
        """Plan `(expert id, kind)` pairs as built by `job_id`."""
        with self._lock:
            for expert_id, kind in ids:
                self._planned[expert_id] = Planned(job_id, what, kind)

    def clear(self, job_id: str) -> None:
        with self._lock:
            self._planned = {k: v for k, v in self._planned.items() if v.job_id != job_id}

    def get(self, expert_id: str) -> Planned | None:
        with self._lock:
            return self._planned.get(expert_id)

    def items(self) -> list[tuple[str, Planned]]:
        with self._lock:
            return sorted(self._planned.items())
