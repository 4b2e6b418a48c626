"""The monitor's own consumer: the standard runner's guarantees at the monitor's volume.

The monitor receives a copy of every message of the pipeline (each file is at least a command and
an event), and its handling is a few dictionary updates. Profiled under the standard
``common.bus.consumer.Runner``, nearly all its time went to what that runner spends per delivery
to serve handlers that wait: an aio-pika message object, two tasks, a ``Context``, bound log
context, and one ack frame written to the socket per message. So this runner:

- observes each delivery synchronously, with no ``await`` in between, so deliveries are observed
  in the order the broker sent them; no ``Context``, no bound log context, no semaphore;
- acks through the runner's ``AckWindow`` with a larger batch, and only **once the state
  counting a delivery is saved** in the catalogue (``checkpoint``: every ``monitor.save_interval``
  seconds, or as soon as half the prefetch waits). Because observation is in delivery order, a
  snapshot holds exactly the deliveries counted before it;
- publishes alerts from their own task (``MonitorResources.observe``), so a slow confirm never
  holds up counting.

Active / standby (``daemons.monitor.role``): the runner consumes only while this monitor holds the
``monitor`` role. A standby declares the queue and waits (``start`` with the consumer paused);
``resume`` consumes once the role is taken and the saved state restored; ``pause`` cancels the
consumer when the role is lost and gives every delivery counted but not saved back to the queue
(one ``basic.nack multiple requeue``): the successor counts it from its saved state. A delivery
arriving after the role was lost is given back the same way.

It overrides the base ``Runner``'s extension points (``deliver``, ``ack_window``, ``in_flight``, ``busy``),
and ``start`` / ``stop_consuming`` / ``drain`` to add the role and the last save at a clean stop:
consumption on the underlying aiormq channel, re-creation of the consumer after a reconnection or
after the broker cancelled it (its queue deleted), and the final flush of acks on drain are still
the base ``Runner``'s. A paused consumer is the base's "not meant to consume" (``_stopping``, no
consumer tag), so neither a reconnection nor a recovery consumes again behind the role's back.

At-least-once holds, and more tightly than before: a message is acked only after a save holding
its count is committed, so a monitor killed at any moment loses no count (its successor restores
the last save, and the broker redelivers what was not acked). A message counts twice only when
the monitor dies between a save's commit and the ack frame (milliseconds), or when its channel
dies with the acks (the broker redelivers them, as any redelivery always was).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
import structlog
from aiormq.abc import DeliveredMessage

from common import codec
from common.bus import headers as H
from common.bus.acks import AckWindow
from common.bus.consumer import Runner, _has_consumer
from common.bus.retry import classify
from common.log_folding import FoldedLog
from common.periodic import every
from daemons.monitor import snapshot

log = structlog.get_logger("spool.monitor")

# One ack frame per this many deliveries, at most half the prefetch so the broker never waits on us.
ACK_EVERY = 200
# ... or this long after the first delivery not acked yet, so a quiet bus still gets its acks.
ACK_DELAY = 0.05


class MonitorRunner(Runner):
    """``Runner`` for the monitor service: same queue, prefetch, stop and drain contract."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # One line per cause per minute: the monitor sees every bad message of the whole bus.
        self._lines = FoldedLog(log)
        # Delivery tags counted and not saved yet, in delivery order, and the window they belong to.
        self._counted: list[int] = []
        self._counted_window: AckWindow | None = None
        self._save_every = max(1, self.settings.daemon(self.service.name).prefetch // 2)
        self._due = asyncio.Event()  # half the prefetch waits for a save: save now
        self._save_lock = asyncio.Lock()  # a save and a give-back never interleave
        self._saver: asyncio.Task[None] | None = None
        self._shut = False  # the process is stopping: never consume again
        self.saves = 0  # saves committed (tests, and curiosity)

    def ack_window(self, channel: aiormq.abc.AbstractChannel) -> AckWindow:
        prefetch = self.settings.daemon(self.service.name).prefetch
        return AckWindow(channel, every=max(1, min(ACK_EVERY, prefetch // 2)), delay=ACK_DELAY)

    @property
    def in_flight(self) -> int:
        """Deliveries counted but not acked yet: waiting for a save, or for their ack frame."""
        return len(self._counted) + (len(self.acks) if self.acks is not None else 0)

    @property
    def busy(self) -> int:
        """None: observing a delivery is synchronous, and what is counted but not saved yet is
        saved and acked by ``drain``. (Counting those, ``once`` mode never ended: the monitor's
        own heartbeat arrives every second and waits up to ``save_interval`` for its save.)"""
        return 0

    # --- active / standby -----------------------------------------------------------------------
    async def start(self) -> None:
        res = self.resources
        res.runner = self
        # The base's "not meant to consume" (the queue declared all the same): consuming starts
        # only through ``resume``, here or when the role is taken, whichever comes first.
        self._stopping = True
        await super().start()
        self._saver = asyncio.create_task(
            every(self.settings.monitor.save_interval, self.checkpoint, name="monitor-save", log=log,
                  wake=self._due)
        )  # fmt: skip
        if res.role.active:
            await self.resume()
        else:
            log.info("monitor_standby", queue=self.queue_name, active=res.role.holder)

    async def resume(self) -> None:
        """The role was taken (and the saved state restored): consume."""
        if self._shut or self._queue is None:
            return
        self._stopping = False
        try:
            await self._consume()
        except Exception as exc:  # the queue gone, the broker refusing: the base's recovery
            log.error("monitor_consume_failed", queue=self.queue_name, error=repr(exc))
            if self._recovery is None or self._recovery.done():
                self._recovery = asyncio.get_running_loop().create_task(self._recover())
            return
        log.info("consuming", queue=self.queue_name, daemon=self.service.name)

    async def pause(self) -> None:
        """The role was lost: stop consuming, give back what was counted and not saved."""
        self._stopping = True
        async with self._consume_lock:
            underlay, tag = self._underlay, self._tag
            self._tag = None
            if underlay is not None and tag is not None and _has_consumer(underlay, tag):
                try:
                    await underlay.basic_cancel(tag)
                except Exception as exc:  # channel gone: nothing more arrives on it anyway
                    log.warning("cancel_failed", queue=self.queue_name, error=repr(exc))
        async with self._save_lock:
            await self._give_back()

    async def _give_back(self) -> None:
        taken, window = self._counted, self._counted_window
        self._counted = []
        if window is None or not taken or window.channel.is_closed:
            return
        try:
            await window.flush()  # the saved ones' acks first: the nack below covers every tag up to its own
            await window.channel.basic_nack(max(taken), multiple=True, requeue=True)
        except Exception as exc:  # the channel died: the broker requeued them itself
            log.warning("give_back_failed", error=repr(exc), deliveries=len(taken))
        if self.acks is window:  # its order still lists the given-back tags: start a clean window
            self.acks = self._counted_window = self.ack_window(window.channel)
        log.warning("deliveries_given_back", deliveries=len(taken))

    async def stop_consuming(self) -> None:
        self._shut = True
        await super().stop_consuming()

    async def drain(self, grace: float) -> None:
        """A clean stop: the last alerts out, the last save, its acks; then the base's drain."""
        await asyncio.sleep(0)  # deliveries read before the cancel: observed first
        flushing = self.resources.flushing
        if flushing is not None and not flushing.done():
            await asyncio.wait({flushing}, timeout=min(grace, 5.0))
        # Deliveries sent before the cancel may still be observed while a save is written: save
        # again until none is left (the consumer is cancelled, so this ends at once).
        for _ in range(5):
            await self.checkpoint()
            if not self._counted or not self.resources.role.active:
                break
            await asyncio.sleep(0.01)
        if self._saver is not None:
            self._saver.cancel()
            await asyncio.gather(self._saver, return_exceptions=True)
        await super().drain(grace)

    async def checkpoint(self) -> None:
        """Save the state with everything counted so far, then ack what it holds."""
        res = self.resources
        role = res.role
        if not role.active:
            return
        if not role.valid():
            await role.lose("the role's lease ran out before it could be renewed")
            return
        saved: bool | None = None
        async with self._save_lock:
            if not role.active or (not self._counted and not res.state_changed()):
                return
            taken, window = self._counted, self._counted_window
            self._counted = []
            doc = snapshot.dump(res.state, res.pending_alerts)  # no await since ``taken``: consistent
            try:
                saved = await role.save(doc)
            except Exception as exc:  # the catalogue unreachable: the next save holds these too
                log.warning("monitor_state_not_saved", error=repr(exc), waiting=len(taken))
            if saved:
                self.saves += 1
                res.saved(doc)
                if window is self.acks and window is not None and not window.channel.is_closed:
                    for tag in taken:
                        window.ack(tag)
            elif window is self._counted_window:
                self._counted[:0] = taken  # back at the head, in order
        if saved is False:  # outside the save lock: losing the role gives back under it
            await role.lose("the save was refused: another monitor holds the role, or its lease ran out")

    # --- per delivery ---------------------------------------------------------------------------
    async def deliver(self, message: DeliveredMessage) -> None:
        """Observe one delivery. No ``await`` before the ack bookkeeping: see the module docstring."""
        if not self.resources.role.active:  # the role was lost: the successor counts it
            try:
                await message.channel.basic_nack(message.delivery_tag or 0, requeue=True)
            except Exception as exc:  # channel gone: the broker requeued it itself
                log.warning("give_back_failed", error=repr(exc), deliveries=1)
            return
        props = message.header.properties
        headers = props.headers
        routing_key = str((headers and headers.get(H.ROUTING_KEY)) or message.routing_key or "")
        try:
            msg = codec.decode(message.body, props.content_type, routing_key, props.message_id)
        except Exception as exc:  # undecodable / unknown / invalid: counted, acked, never parked
            self._malformed(routing_key, exc)
        else:
            try:
                self.resources.observe(msg, props.user_id)
                self.stats.processed += 1
            except Exception as exc:  # a bug in the bookkeeping must not stall the whole bus
                self._bug(exc)
        acks = self.acks
        if acks is not None and acks.channel is message.channel:  # else: a replaced channel's
            tag = message.delivery_tag or 0
            acks.delivered(tag)
            if self._counted_window is not acks:  # a new channel: the old one's tags died with it
                self._counted_window, self._counted = acks, []
            self._counted.append(tag)  # acked once saved (``checkpoint``)
            if len(self._counted) >= self._save_every:
                self._due.set()

    def _malformed(self, routing_key: str, exc: Exception) -> None:
        err = classify(exc)
        self.stats.ignored += 1
        self._lines.warning(
            f"ignored:{err.reason}", "malformed_ignored", exc=exc,
            reason=err.reason, error=_printable(err.message[:500]), routing_key=_printable(routing_key[:255]),
        )  # fmt: skip
        self.resources.state.observe_malformed(routing_key, err.reason, err.message)

    def _bug(self, exc: Exception) -> None:
        self._lines.error("observe_failed", "observe_failed", exc=exc, exc_info=exc)


def _printable(text: str) -> str:
    """``text`` as a log line can carry it: a lone surrogate (valid in JSON) escaped, not raised."""
    return text.encode("utf-8", "backslashreplace").decode()
