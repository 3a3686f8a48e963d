"""A per-upstream circuit breaker: stop hammering an upstream that keeps failing.

closed --K consecutive failures--> open --cool-down elapsed--> half_open --probe succeeds--> closed
                                     ^                              |
                                     +-------probe fails------------+

While open, calls fail fast. In half_open exactly one probe is let through at a time; the others
still fail fast until the probe reports. All calls happen on the event loop, so no lock is needed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

BreakerState = Literal["closed", "open", "half_open"]
STATE_CODES: dict[BreakerState, int] = {"closed": 0, "half_open": 1, "open": 2}


class CircuitBreaker:
    def __init__(self, threshold: int = 5, cooldown_s: float = 30.0, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0  # consecutive
        self._opened_at = 0.0
        self._probing = False
        self.times_opened = 0

    def configure(self, threshold: int, cooldown_s: float) -> None:
        self.threshold, self.cooldown_s = threshold, cooldown_s

    @property
    def state(self) -> BreakerState:
        if self._state == "open" and self._clock() - self._opened_at >= self.cooldown_s:
            return "half_open"
        return self._state

    def allow(self) -> bool:
        """May a call go to the upstream now? In half_open, the caller that gets True is the probe and
        must report back through success(), failure() or release()."""
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            return False
        self._state = "half_open"
        if self._probing:
            return False
        self._probing = True
        return True

    def retry_after(self) -> float:
        """Seconds until a probe will be let through (0 when calls are allowed now)."""
        if self._state != "open":
            return 0.0
        return max(0.0, self.cooldown_s - (self._clock() - self._opened_at))

    def success(self) -> None:
        self._state, self._failures, self._probing = "closed", 0, False

    def failure(self) -> None:
        self._failures += 1
        was_probe = self._state == "half_open"
        self._probing = False
        if was_probe or self._failures >= self.threshold:
            if self._state != "open":
                self.times_opened += 1
            self._state, self._opened_at = "open", self._clock()

    def release(self) -> None:
        """The call ended without telling anything about the upstream (e.g. the client went away)."""
        self._probing = False

    def reset(self) -> None:
        self.success()

    def snapshot(self) -> dict[str, Any]:
        return {"state": self.state, "consecutive_failures": self._failures, "threshold": self.threshold,
                "cooldown_s": self.cooldown_s, "retry_after_s": round(self.retry_after(), 3),
                "times_opened": self.times_opened}
