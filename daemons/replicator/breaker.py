"""The circuit breaker of one destination endpoint: where the replicator decides to stop trying.

    closed (ok) --K consecutive endpoint failures--> open (paused) --cool-down over--> half-open
    half-open (probing) --the one probe copy succeeds--> closed
    half-open --the probe fails--> open (cool-down doubled, up to a maximum)

Only failures attributed to the endpoint count (not writable, full, I/O error, a copy that landed
corrupt); a success resets the count. While open, copies for the endpoint are parked in the
catalogue instead of burning retry attempts.

The breaker is the endpoint's, not one process's: its state lives in the catalogue
(``storage_endpoints.health``, ``common.catalogue.transfers``) and holds for every replicator
instance. What stays in each instance is the count of its consecutive failures (``FailureCount``):
the instance whose count reaches K opens the breaker for all (a shared count would cost a write
per successful copy, to reset it). Which copy may go is decided here from the shared state as
last read (``admission``), without I/O, so every rule is unit-tested directly; the transitions
themselves are conditional UPDATEs (one instance wins each: ``health``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from common.catalogue.transfers import EndpointView

# "go": copy; "try_probe": the probe may be due (claim it in the catalogue first); "wait": park.
Admission = Literal["go", "try_probe", "wait"]


@dataclass
class FailureCount:
    """Consecutive endpoint failures seen by this instance while the breaker is closed."""

    failures_to_open: int
    failures: int = 0

    def record_failure(self, *, at_once: bool = False) -> bool:
        """Count one; True when the breaker should open now. ``at_once``: a failure no retry mends
        (credentials refused) opens it by itself."""
        self.failures += 1
        if at_once or self.failures >= self.failures_to_open:
            self.failures = 0
            return True
        return False

    def record_success(self) -> None:
        self.failures = 0


def admission(view: EndpointView, me: str, live: Collection[str], now: datetime) -> Admission:
    """May a copy into the endpoint start, by the shared breaker as last read?

    Closed: go. Paused with the cool-down over, or being probed by an instance no longer alive (its
    probe will never report): this copy may be the probe, if this instance wins the claim. Paused
    and cooling down, or probed by a live instance (this one included: one probe at a time): wait.
    """
    if view.health == "ok":
        return "go"
    if view.probe_due(now):
        return "try_probe"
    if view.health == "probing" and view.prober != me and view.prober not in live:
        return "try_probe"
    return "wait"
