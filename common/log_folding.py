"""Folding repeated log lines: one line per reason per window, and a count of the rest.

Thousands of identical failures (a broker restart, an endpoint gone, a flood of malformed
messages) must not drown the one line that matters. A reason (a key the caller chooses: the
outcome and its cause, say) gets one line per ``window`` seconds; the next line of that reason
carries ``similar_since_last_line``: how many were folded since. Folding never hides a bug: the
first exception of each type a process meets is always let through, whole, whatever its reason's
window says (``first_of_its_type``); only its repeats are folded.

``ReasonThrottle`` only decides (``admit``); ``FoldedLog`` decides and writes the line. The
standard library's records (aio-pika, ...) are folded the same way by ``common.logging``'s
``FoldingHandler``.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Hashable
from typing import Any

# Distinct exception types remembered per process (a bound for a process that meets many).
MAX_EXCEPTION_TYPES = 1024
_seen_exception_types: set[str] = set()
_seen_lock = threading.Lock()


def first_of_its_type(exc: BaseException | None) -> bool:
    """Whether ``exc`` is the first exception of its type this process met (and remember it).

    Folding lets such a one through whole: the one traceback of a new bug must not be folded into
    the count line of an older one with the same reason.
    """
    if exc is None:
        return False
    kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
    with _seen_lock:
        if kind in _seen_exception_types or len(_seen_exception_types) >= MAX_EXCEPTION_TYPES:
            return False
        _seen_exception_types.add(kind)
        return True


class ReasonThrottle:
    """One log line per reason per window, with a count of what was folded into it.

    Thousands of identical retries must not drown the one line that matters. ``admit`` says
    whether to log now and how many were folded since the last line; ``due`` hands over the
    counts of windows that ended with lines folded (and forgets expired reasons), for a caller
    that reports them without waiting for the reason to come back.
    """

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self._seen: dict[Hashable, tuple[float, int]] = {}

    def admit(self, reason: Hashable, exc: BaseException | None = None) -> tuple[bool, int]:
        """``exc``: the exception the line is about; by default the one being handled, if any
        (called from an ``except`` block). The first of its type is always admitted."""
        now = time.monotonic()
        start, folded = self._seen.get(reason, (0.0, 0))
        current = exc if exc is not None else sys.exc_info()[1]
        if now - start >= self.window:
            self._seen[reason] = (now, 0)
            first_of_its_type(current)  # logged now: its type is seen
            return True, folded
        if first_of_its_type(current):
            self._seen[reason] = (start, 0)  # the window goes on; its count restarts after this line
            return True, folded
        self._seen[reason] = (start, folded + 1)
        return False, 0

    def due(self, *, everything: bool = False) -> list[tuple[Hashable, int]]:
        now = time.monotonic()
        ended = [r for r, (start, _) in self._seen.items() if everything or now - start >= self.window]
        counts = [(r, self._seen.pop(r)[1]) for r in ended]
        return [(r, n) for r, n in counts if n]


class FoldedLog:
    """Writes through ``logger`` the lines ``ReasonThrottle`` admits, with the count of those it
    folded (``similar_since_last_line``, only when some were)."""

    def __init__(self, logger: Any, window: float = 60.0) -> None:
        self.logger = logger
        self.throttle = ReasonThrottle(window)

    def warning(
        self, key: Hashable, event: str, /, *, exc: BaseException | None = None, **fields: Any
    ) -> None:
        self.log("warning", key, event, exc=exc, **fields)

    def error(self, key: Hashable, event: str, /, *, exc: BaseException | None = None, **fields: Any) -> None:
        self.log("error", key, event, exc=exc, **fields)

    def log(
        self, level: str, key: Hashable, event: str, /, *, exc: BaseException | None = None, **fields: Any
    ) -> None:
        """``key``: what lines are folded by (a reason, for ``ReasonThrottle``); ``exc``: what the
        line is about (see ``ReasonThrottle.admit``), written with its traceback only if
        ``fields`` ask for it (``exc_info``)."""
        admitted, folded = self.throttle.admit(key, exc)
        if not admitted:
            return
        if folded:
            fields["similar_since_last_line"] = folded
        getattr(self.logger, level)(event, **fields)
