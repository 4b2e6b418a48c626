"""Coalesced acknowledgements for one AMQP channel: one ``basic.ack multiple`` for many deliveries.

Why: at ingest rates every delivery acked on its own costs an ack frame, a socket write and, for a
quorum queue, one settle command through the broker's Raft log. Handlers finish out of order
(concurrent, batched catalogue writes), so this window keeps the channel's delivery tags in the
order they arrived and, when it flushes,

- acks the contiguous run of finished deliveries at its head with one ``multiple=True`` frame;
- acks on its own every finished delivery stuck behind an unfinished one for more than ``hold``
  seconds (a slow copy at the head must not keep hundreds of finished messages unacked, holding
  the prefetch window shut);
- never acks a delivery that has not finished: a multiple ack covers only tags below the oldest
  unfinished one.

A flush runs ``delay`` seconds after the first finish it would cover, or at once when ``every``
finishes are waiting. Requeues (``nack``) are sent at once, before any multiple ack could cover
them. Acks still waiting when the channel dies are lost with it and the broker redelivers those
messages: at-least-once as before (handlers are idempotent), only the duplicate window is a few
milliseconds wider. ``flush`` is awaited on a graceful stop so a drained daemon leaves none behind.

Delivery tags count per channel: a reconnected channel gets a new window (``Runner``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import aiormq
import structlog

log = structlog.get_logger("spool.acks")

# One ack frame per this many finished deliveries at most ...
ACK_EVERY = 128
# ... and no finished delivery waits longer than this for its ack when the head of the window is
# finished too; one behind an unfinished head waits at most HOLD.
ACK_DELAY = 0.02
HOLD = 0.25


class AckWindow:
    def __init__(
        self,
        channel: aiormq.abc.AbstractChannel,
        *,
        every: int = ACK_EVERY,
        delay: float = ACK_DELAY,
        hold: float = HOLD,
    ) -> None:
        self.channel = channel
        self._every = max(1, every)
        self._delay = delay
        self._hold = hold
        self._order: deque[int] = deque()  # tags delivered and not yet acked, in delivery order
        self._finished: dict[int, float] = {}  # finished, not acked yet -> when it finished
        self._settled: set[int] = set()  # acked alone or requeued, still somewhere in _order
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        """Finished deliveries whose ack has not been sent yet."""
        return len(self._finished)

    def delivered(self, tag: int) -> None:
        self._order.append(tag)

    def ack(self, tag: int) -> None:
        """``tag`` is done with: ack it soon, together with its neighbours."""
        self._finished[tag] = time.monotonic()
        if len(self._finished) >= self._every:
            self._flush_soon(0.0)
        elif self._timer is None and self._flushing is None:
            self._flush_soon(self._delay)

    async def nack(self, tag: int, *, requeue: bool = True) -> None:
        """Give ``tag`` back to the broker now (a multiple ack sent later never covers it)."""
        self._settled.add(tag)
        await self.channel.basic_nack(tag, requeue=requeue)

    async def flush(self) -> None:
        """Send every ack that is due now, and those held behind an unfinished head too."""
        await self._send(force=True)

    # --- internals ------------------------------------------------------------------------------
    def _flush_soon(self, delay: float) -> None:
        if self._timer is not None:
            if delay > 0:
                return
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._start_flush)

    def _start_flush(self) -> None:
        self._timer = None
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._background_flush())

    async def _background_flush(self) -> None:
        try:
            await self._send(force=False)
        except Exception as exc:  # channel gone: the broker requeued what was unacked
            log.warning("ack_failed", error=repr(exc), pending=len(self._finished))
            self._finished.clear()
        finally:
            self._flushing = None
        if self._finished and self._timer is None:
            # Finished meanwhile, or waiting behind an unfinished head: look again shortly.
            self._flush_soon(self._delay)

    async def _send(self, *, force: bool) -> None:
        last = self._pop_head()
        if last is not None:
            await self.channel.basic_ack(last, multiple=True)
        now = time.monotonic()
        alone = [t for t, when in self._finished.items() if force or now - when >= self._hold]
        for tag in alone:
            del self._finished[tag]
            self._settled.add(tag)
            await self.channel.basic_ack(tag)

    def _pop_head(self) -> int | None:
        """Remove the finished run at the head of the window; the newest tag to ack, if any."""
        order, finished, settled = self._order, self._finished, self._settled
        last: int | None = None
        while order:
            tag = order[0]
            if tag in finished:
                del finished[tag]
                last = tag
            elif tag in settled:
                settled.discard(tag)  # acked alone or requeued before: already off the channel
            else:
                break
            order.popleft()
        return last
