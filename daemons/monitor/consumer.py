"""The monitor's own consumer: the standard runner's guarantees at the monitor's volume.

The monitor receives a copy of every message of the pipeline (each file is at least a command and
an event), and its handling is a few dictionary updates. Profiled under the standard
``common.bus.consumer.Runner``, nearly all its time went to what that runner spends per delivery
to serve handlers that wait: an aio-pika message object, two tasks, a ``Context``, bound log
context, and one ack frame written to the socket per message. So this runner:

- consumes on the underlying aiormq channel: no aio-pika message object, one task per delivery;
- observes each delivery synchronously, with no ``await`` in between, so deliveries are observed
  in the order the broker sent them;
- acks with ``multiple`` once per ``ACK_EVERY`` deliveries, or ``ACK_DELAY`` seconds after the
  first unacked one, whichever comes first: one ack frame per batch. Because observation is in
  delivery order, acking up to the newest observed tag never acks a message not yet counted;
- publishes alerts from their own task (``MonitorResources.observe``), so a slow confirm never
  holds up counting.

At-least-once holds as before: a message is acked only after it was counted; acks still pending
when a channel dies are redelivered by the broker and counted again, as any redelivery always was.
The robust channel re-creates the consumer after a reconnection (``reopen_callbacks``), since
aio-pika only restores consumers it created itself.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
import structlog
from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import DeliveredMessage

from common import codec
from common.bus import headers as H
from common.bus.consumer import Runner
from common.bus.retry import classify
from common.bus.topology import work_queue_arguments

log = structlog.get_logger("spool.monitor")

# One ack frame per this many deliveries, at most half the prefetch so the broker never waits on us.
ACK_EVERY = 200
# ... or this long after the first delivery not acked yet, so a quiet bus still gets its acks.
ACK_DELAY = 0.05


class MonitorRunner(Runner):
    """``Runner`` for the monitor service: same queue, prefetch, stop and drain contract."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._ack_channel: aiormq.abc.AbstractChannel | None = None
        self._ack_tag = 0  # newest delivery tag observed and not yet acked
        self._unacked = 0
        self._ack_every = ACK_EVERY
        self._ack_timer: asyncio.TimerHandle | None = None
        self._ack_tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        prefetch = self.settings.daemon(self.service.name).prefetch
        self._ack_every = max(1, min(ACK_EVERY, prefetch // 2))
        await self.channel.set_qos(prefetch_count=prefetch)
        # Declared on the robust channel so the queue itself is restored after a broker restart.
        self._queue = await self.channel.declare_queue(
            self.queue_name, durable=True, arguments=work_queue_arguments(self.settings, self.service.name)
        )
        await self._consume()
        if isinstance(self.channel, AbstractRobustChannel):
            self.channel.reopen_callbacks.add(self._on_reopen)
        log.info("consuming", queue=self.queue_name, daemon=self.service.name, acks="batched")

    async def _consume(self) -> None:
        self._underlay = await self.channel.get_underlay_channel()
        ok = await self._underlay.basic_consume(self.queue_name, self._deliver)
        self._tag = ok.consumer_tag

    async def _on_reopen(self, _channel: Any) -> None:
        """The robust channel came back (reconnection, or a channel error): the old channel's unacked
        messages are back in the queue, and the consumer must be created again."""
        self._ack_channel, self._ack_tag, self._unacked = None, 0, 0
        if self._tag is not None:  # still meant to consume (not stopping)
            await self._consume()

    async def stop_consuming(self) -> None:
        if self._underlay is not None and self._tag is not None:
            try:
                await self._underlay.basic_cancel(self._tag)
            except Exception as exc:  # broker already gone: nothing more will arrive anyway
                log.warning("cancel_failed", queue=self.queue_name, error=repr(exc))
        self._tag = None
        await self._ack()

    async def drain(self, grace: float) -> None:
        """Nothing is ever half-handled here: send the last acks, then close the channel."""
        await self._ack()
        if self._ack_tasks:
            await asyncio.wait(set(self._ack_tasks), timeout=grace)
        await super().drain(grace)

    @property
    def in_flight(self) -> int:
        """Deliveries counted but not acked yet (a batch, for at most ``ACK_DELAY``)."""
        return self._unacked

    # --- per delivery ---------------------------------------------------------------------------
    async def _deliver(self, message: DeliveredMessage) -> None:
        """Observe one delivery. No ``await`` before the ack bookkeeping: see the module docstring."""
        props = message.header.properties
        headers = props.headers
        routing_key = str((headers and headers.get(H.ROUTING_KEY)) or message.routing_key or "")
        try:
            msg = codec.decode(message.body, props.content_type, routing_key, props.message_id)
        except Exception as exc:  # undecodable / unknown / invalid: counted, acked, never parked
            self._malformed(routing_key, exc)
        else:
            try:
                self.resources.observe(msg)
                self.stats.processed += 1
            except Exception as exc:  # a bug in the bookkeeping must not stall the whole bus
                self._bug(exc)
        channel = message.channel
        if channel is not self._ack_channel:  # a new channel after a reconnection: tags restart
            self._ack_channel, self._unacked = channel, 0
        self._ack_tag = message.delivery.delivery_tag or 0  # type: ignore[union-attr]  # a Deliver here
        self._unacked += 1
        if self._unacked >= self._ack_every:
            await self._ack()
        elif self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY, self._ack_later)

    def _malformed(self, routing_key: str, exc: Exception) -> None:
        err = classify(exc)
        self.stats.ignored += 1
        admitted, folded = self._throttle.admit(f"ignored:{err.reason}")
        if admitted:
            log.warning(
                "malformed_ignored", reason=err.reason, error=err.message, routing_key=routing_key,
                similar_since_last_line=folded,
            )  # fmt: skip
        self.resources.state.observe_malformed(routing_key, err.reason, err.message)

    def _bug(self, exc: Exception) -> None:
        admitted, folded = self._throttle.admit("observe_failed")
        if admitted:
            log.error("observe_failed", exc_info=exc, similar_since_last_line=folded)

    # --- acks -----------------------------------------------------------------------------------
    def _ack_later(self) -> None:
        self._ack_timer = None
        if self._unacked:
            task = asyncio.get_running_loop().create_task(self._ack())
            self._ack_tasks.add(task)
            task.add_done_callback(self._ack_tasks.discard)

    async def _ack(self) -> None:
        """Ack every delivery up to the newest observed one, in one frame."""
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        channel, tag = self._ack_channel, self._ack_tag
        if channel is None or not self._unacked:
            return
        self._unacked = 0
        try:
            await channel.basic_ack(tag, multiple=True)
        except Exception as exc:  # channel gone: the broker requeued them; they will be counted again
            log.warning("ack_failed", error=repr(exc), delivery_tag=tag)
