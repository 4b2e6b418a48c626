"""Where a failed delivery goes next: the one retry policy of every daemon.

Pure function of (error, attempt, settings) so it is unit-tested without a broker. The consumer
runner applies the decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.config import BusSettings
from common.errors import Permanent, Retryable, SpoolError

UNEXPECTED = "unexpected_error"


@dataclass(frozen=True)
class Decision:
    action: Literal["retry", "dead"]
    reason: str
    error: str
    tier: int | None = None  # index into bus.retry_tiers when action == "retry"
    delay: float | None = None


def classify(exc: BaseException) -> SpoolError:
    """Unknown exceptions count as retryable (capped like the rest) under reason ``unexpected_error``."""
    if isinstance(exc, SpoolError):
        return exc
    return Retryable(UNEXPECTED, f"{type(exc).__name__}: {exc}")


def decide(exc: BaseException, attempt: int, bus: BusSettings) -> Decision:
    """Retry with the tier for this attempt, or dead-letter (permanent, or attempts exhausted).

    ``attempt`` is the attempt that just failed (1 = first delivery). Tier ``n`` waits
    ``retry_tiers[min(n, last)]`` seconds, so the back-off grows (the default tiers are roughly
    exponential) then stays at the last tier. The TTL is fixed per tier queue because per-message
    TTLs on one queue block behind the longest; spreading comes from failures landing in a tier at
    different times rather than from random jitter.
    """
    err = classify(exc)
    if isinstance(err, Permanent):
        return Decision("dead", err.reason, err.message)
    if attempt >= bus.max_attempts:
        return Decision("dead", err.reason, f"gave up after {attempt} attempts: {err.message}")
    tier = min(attempt - 1, len(bus.retry_tiers) - 1)
    return Decision("retry", err.reason, err.message, tier=tier, delay=bus.retry_tiers[tier])
