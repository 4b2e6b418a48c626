"""Periodic work in a daemon: the one loop every background duty runs in.

A daemon writes only the function of one round (look at the queues, evaluate new rules, send the
heartbeats, ...) and hands it to ``every``, which owns the rest, the same for every loop:

- **when**: a round at once, then each next one ``interval`` seconds after the previous *ended*
  (rounds never overlap and a slow round is not followed by a burst), shortened at random by up
  to ``jitter`` (a fraction of the interval: downwards only, as the retry tiers' jitter, so a
  bound on the interval stays a bound), or cut short by ``wake`` (something new to do);
- **errors**: an exception of a round is logged (``background_failed``, or the caller's
  ``on_error``) and the next round comes as planned. A background duty never ends its daemon and
  never stops silently: five loops each with their own ``except`` were five places to get it wrong;
- **stop**: cancelling the task ends the loop at once, in a round or in the pause between two
  (nothing here ever swallows ``CancelledError``). Whoever created the task cancels it when the
  daemon stops, and awaits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

_log = structlog.get_logger("spool.periodic")


async def every(
    interval: float,
    work: Callable[[], Awaitable[object]],
    *,
    name: str,
    log: Any = None,
    jitter: float = 0.0,
    wake: asyncio.Event | None = None,
    on_error: Callable[[Exception], None] | None = None,
) -> None:
    """Run ``work`` now and then every ``interval`` seconds (see the module docstring) until the
    task running this is cancelled.

    ``name`` says which loop failed in the ``background_failed`` line, written through ``log``
    (the daemon's logger; this module's by default) unless ``on_error`` handles the exception.
    ``wake``: setting it starts the next round without waiting for the rest of the pause; it is
    cleared as each round begins, so a wake during a round is not lost: another round follows.
    """
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be a fraction of the interval (0 to 1), not {jitter}")
    logger = log if log is not None else _log
    while True:
        if wake is not None:
            wake.clear()
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _failed(exc, name, logger, on_error)
        await _pause(pause_for(interval, jitter), wake)


def _failed(exc: Exception, name: str, logger: Any, on_error: Callable[[Exception], None] | None) -> None:
    if on_error is not None:
        try:
            on_error(exc)
            return
        except Exception:  # a faulty handler must not end the loop either: the plain line instead
            pass
    logger.error("background_failed", loop=name, error=str(exc), error_type=type(exc).__name__)


def pause_for(interval: float, jitter: float) -> float:
    """The pause before the next round: ``interval`` shortened by a random part of ``jitter``."""
    if not jitter:
        return interval
    return interval * (1.0 - jitter * random.random())


async def _pause(seconds: float, wake: asyncio.Event | None) -> None:
    if wake is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), seconds)
