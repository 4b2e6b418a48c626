"""The circuit breaker of one destination endpoint: where the replicator decides to stop trying.

    closed --K consecutive endpoint failures--> open --cool-down elapsed--> half-open
    half-open --the one probe copy succeeds--> closed
    half-open --the probe fails--> open (cool-down doubled, up to a maximum)

Only failures attributed to the endpoint count (not writable, full, I/O error, a copy that landed
corrupt); a success resets the count. While open, copies for the endpoint are parked in the
catalogue instead of burning retry attempts. Pure state with an injectable clock, so every
transition is unit-tested without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Admission = Literal["go", "probe", "wait"]
BreakerState = Literal["closed", "open", "half_open"]


@dataclass
class CircuitBreaker:
    failures_to_open: int
    cooldown: float
    max_cooldown: float
    clock: Callable[[], float] = time.monotonic
    state: BreakerState = "closed"
    failures: int = 0  # consecutive, while closed
    opened_at: float | None = None
    current_cooldown: float = field(default=0.0)
    probing: bool = False
    last_reason: str | None = None
    last_error: str | None = None

    def __post_init__(self) -> None:
        self.current_cooldown = self.cooldown

    def admit(self) -> Admission:
        """May a copy to this endpoint start now? ``probe``: yes, as the single trial copy."""
        if self.state == "closed":
            return "go"
        if self.state == "open" and self.cooldown_elapsed():
            self.state = "half_open"
        if self.state == "half_open" and not self.probing:
            self.probing = True
            return "probe"
        return "wait"

    def cooldown_elapsed(self) -> bool:
        return self.opened_at is not None and self.clock() - self.opened_at >= self.current_cooldown

    def record_failure(self, reason: str, error: str, *, at_once: bool = False) -> bool:
        """Count an endpoint failure; True when this failure opened the breaker. ``at_once``: a
        failure no retry mends (credentials refused) opens a closed breaker by itself."""
        self.last_reason, self.last_error = reason, error
        if self.state == "half_open":
            # The probe failed: back off longer before the next one.
            self.probing = False
            self.current_cooldown = min(self.current_cooldown * 2, self.max_cooldown)
            self._open()
            return False
        if self.state == "open":
            return False  # a copy admitted before the breaker opened, finishing late
        self.failures += 1
        if at_once or self.failures >= self.failures_to_open:
            self.current_cooldown = self.cooldown
            self._open()
            return True
        return False

    def record_success(self) -> bool:
        """A copy landed; True when this closed an open / half-open breaker (the endpoint resumes)."""
        was_paused = self.state != "closed"
        self.state = "closed"
        self.failures = 0
        self.probing = False
        self.opened_at = None
        self.current_cooldown = self.cooldown
        return was_paused

    def release_probe(self) -> None:
        """The probe ended without telling anything about the endpoint (e.g. its source was bad):
        let the next copy be the probe."""
        self.probing = False

    def paused_for(self) -> float:
        return 0.0 if self.opened_at is None else self.clock() - self.opened_at

    def _open(self) -> None:
        self.state = "open"
        self.opened_at = self.clock()
        self.failures = 0
