"""Where a failed delivery goes next: the one retry policy of every daemon.

Pure function of (error, attempt, settings, random source) so it is unit-tested without a broker.
The consumer runner applies the decision.

**Jitter.** Each retry waits a random delay drawn uniformly from ``[(1 - JITTER) * T, T]``, ``T``
being its tier's ``retry_tiers`` entry: failures that happened together (an endpoint down for
everyone) do not all come back in the same instant. The runner sets the delay as the copy's
per-message ``expiration`` in the tier queue, whose fixed ``x-message-ttl`` stays ``T``.

Why only downwards, and why that is safe in a FIFO delay queue: RabbitMQ expires messages only at
the head of a queue, and applies the lower of the queue's TTL and the message's expiration. So

- no message ever waits longer than ``T`` (its tier, as before): a message behind one that expires
  later leaves when that one does, at most ``T`` after the earlier one entered, which is earlier
  than ``T`` after itself entered -- head-of-line waiting is bounded by the jitter width;
- the tier queues keep their declared arguments: nothing to migrate on an existing broker (an
  upward jitter would need a longer ``x-message-ttl``, and RabbitMQ refuses to redeclare a queue
  with other arguments).

Failures entering a tier at different times keep their whole spread; a burst entering at the very
same instant keeps part of it (each leaves at the latest expiry among those ahead of it), and still
never later than ``T``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from common.config import BusSettings
from common.errors import Permanent, Retryable, SpoolError

UNEXPECTED = "unexpected_error"
# A retry waits between (1 - JITTER) and 1 times its tier's delay (see the module docstring).
JITTER = 0.2
_random = random.Random()


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


def decide(exc: BaseException, attempt: int, bus: BusSettings, rng: random.Random | None = None) -> Decision:
    """Retry with the tier for this attempt, or dead-letter (permanent, or attempts exhausted).

    ``attempt`` is the attempt that just failed (1 = first delivery). Tier ``n`` waits
    ``retry_tiers[min(n, last)]`` seconds, so the back-off grows (the default tiers are roughly
    exponential) then stays at the last tier, less a random jitter (``jittered``).
    """
    err = classify(exc)
    if isinstance(err, Permanent):
        return Decision("dead", err.reason, err.message)
    if attempt >= bus.max_attempts:
        return Decision("dead", err.reason, f"gave up after {attempt} attempts: {err.message}")
    tier = min(attempt - 1, len(bus.retry_tiers) - 1)
    return Decision("retry", err.reason, err.message, tier=tier, delay=jittered(bus.retry_tiers[tier], rng))


def jittered(seconds: float, rng: random.Random | None = None) -> float:
    """A delay drawn uniformly from ``[(1 - JITTER) * seconds, seconds]``, in whole milliseconds
    (the unit of AMQP's ``expiration``)."""
    low = (1 - JITTER) * seconds
    drawn = (rng or _random).uniform(low, seconds)
    return min(seconds, max(low, round(drawn, 3)))
