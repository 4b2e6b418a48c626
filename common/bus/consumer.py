"""The consumer runner: the one place that turns a handler's outcome into ack, retry or dead letter.

For each delivery: decode (undecodable / invalid -> dead letter at once), call the handler with a
``Context``, then

- success             -> ack;
- ``Retryable`` / any unexpected exception, attempts left
                      -> copy into ``<queue>.retry.<tier>`` with the attempt header incremented, ack;
- ``Permanent``, or attempts exhausted
                      -> copy into ``<queue>.dead`` with reason / error / attempts / daemon / host /
                         time headers, publish a ``file.failed`` event, ack.

The copy is confirmed by the broker *before* the original is acked, so a crash in between gives a
duplicate (handled by idempotent handlers), never a loss. If the copy cannot be published (broker
gone) the original is left unacked and comes back after reconnecting. Acks are coalesced per
channel (``common.bus.acks``): one frame for a run of finished deliveries, sent within
milliseconds, and flushed when the runner drains.

A consumer cancelled by the broker itself (its queue deleted by an operator, say) is logged as
``consumer_cancelled_by_broker``; the runner then declares its daemon's queues and bindings again
and consumes again, retrying with a backoff for as long as the broker refuses. Without this the
daemon would go on running and sending heartbeats while receiving nothing.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustChannel
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from structlog.contextvars import bound_contextvars

from common import codec
from common.bus import admission
from common.bus import headers as H
from common.bus.acks import AckWindow
from common.bus.publisher import AmqpPublisher, copy_of
from common.bus.retry import UNEXPECTED, Decision, classify, decide
from common.bus.service import Context, Service
from common.bus.topology import declare_topology, work_queue_arguments
from common.config import Settings
from common.errors import InvalidMessage, SpoolError
from common.log_folding import FoldedLog
from common.messages import FileFailed, Message, fact_id

log = structlog.get_logger("spool.consumer")
HOST = socket.gethostname()
# Header values are truncated: a dead letter must stay small whatever the exception text.
MAX_ERROR_TEXT = 2000
# After the broker cancelled the consumer: first attempt to consume again after this many seconds,
# doubling up to the maximum while the broker refuses. Never given up: exiting would not help, the
# broker is what has to change (systemd restarts are for crashes).
RECOVERY_DELAY = 1.0
RECOVERY_MAX_DELAY = 30.0
# A declaration that takes longer (broker unreachable meanwhile) counts as a failed attempt.
RECOVERY_ATTEMPT_TIMEOUT = 30.0


@dataclass
class Stats:
    processed: int = 0
    retried: int = 0
    dead: int = 0
    in_flight: int = 0
    # Malformed deliveries acked without a dead letter (services with ``on_malformed`` only).
    ignored: int = 0
    # Consumers the broker cancelled (queue deleted, ...); each was re-created.
    cancelled_by_broker: int = 0
    retried_by_reason: Counter[str] = field(default_factory=Counter)
    dead_by_reason: Counter[str] = field(default_factory=Counter)
    handling: HandlingTimes = field(default_factory=lambda: HandlingTimes())


# Upper bounds (seconds) of the handling-time histogram: a 1 KiB ingest takes milliseconds, a
# 2 GB copy minutes.
HANDLING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


@dataclass
class HandlingTimes:
    """A cumulative histogram of handler durations, carried by heartbeats to the monitor's
    ``spool_handling_seconds`` (Prometheus' histogram shape: counts per upper bound, sum, count)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(HANDLING_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(HANDLING_BUCKETS, seconds)] += 1
        self.total += seconds

    def as_dict(self) -> dict[str, Any]:
        return {"buckets": list(HANDLING_BUCKETS), "counts": list(self.counts), "sum": self.total}


class Delivery:
    """One delivery as the runner needs it: body, AMQP properties, tag, and where to ack it."""

    __slots__ = ("acks", "body", "properties", "routing_key", "sender", "tag")

    def __init__(self, message: DeliveredMessage) -> None:
        self.body: bytes = message.body
        self.properties: Basic.Properties = message.header.properties
        self.routing_key: str | None = message.routing_key
        self.tag: int = message.delivery_tag or 0
        self.acks: AckWindow | None = None
        self.sender: admission.Sender | None = None  # set first thing by ``Runner._handle``


class Runner:
    """Consumes one service's work queue with bounded prefetch and concurrency; acks coalesced.

    A service whose deliveries call for another way of consuming brings a subclass
    (``Service(runner=...)``; the monitor's ``MonitorRunner``). The subclass overrides these,
    and only these; queue, prefetch, reconnection, recovery after a broker cancel, stop and drain
    stay this class's:

    - ``deliver(message)``: what happens to one delivery; aiormq calls it in a task of its own.
      A replacement settles each delivery on ``acks`` when that window is still the delivery's
      channel's (``acks.channel is message.channel``; a delivery from a channel replaced
      meanwhile is the broker's to redeliver): ``acks.delivered(tag)``, then ``acks.ack(tag)``;
    - ``ack_window(channel)``: the ``AckWindow`` made for each new channel (how many acks one
      frame covers, how long one may wait); read it as ``acks``;
    - ``in_flight``: deliveries taken and not settled yet, which the heartbeats report;
    - ``busy``: deliveries still being worked on, which the ``once`` mode waits for (by default
      ``in_flight``; a delivery whose work is done and only its ack waits on the drain is not).
    """

    def __init__(
        self,
        service: Service,
        settings: Settings,
        channel: AbstractChannel,
        publisher: AmqpPublisher,
        resources: Any,
    ) -> None:
        self.service = service
        self.settings = settings
        self.channel = channel
        self.publisher = publisher
        self.resources = resources
        self.stats = Stats()
        self.queue_name = settings.queue(service.name)
        self._limit = asyncio.Semaphore(settings.daemon(service.name).concurrency)
        self._tasks: set[asyncio.Task[Any]] = set()
        # When each running handler took its delivery, and what it is about (insertion order: the
        # first entry is the oldest): the heartbeats report the oldest, the monitor calls it stalled.
        self._since: dict[asyncio.Task[Any], tuple[float, str]] = {}
        self._queue: AbstractQueue | None = None
        self._underlay: aiormq.abc.AbstractChannel | None = None
        # The current channel's ack window (``ack_window``); a new one with each new channel.
        self.acks: AckWindow | None = None
        self._tag: str | None = None
        # One consumer per runner: start, reopen, recovery and stop take turns (see ``_consume``).
        self._consume_lock = asyncio.Lock()
        self._stopping = False
        self._recovery: asyncio.Task[None] | None = None
        self._folded = FoldedLog(log)  # one line per outcome and reason per minute
        self._log = structlog.get_logger(service.name)
        self._trusted = settings.bus.trusted_users()  # Spool's broker users (common.bus.admission)
        # Message ids of the handlers still running when the stop's grace ended (cancelled).
        self.abandoned: list[str] = []

    async def start(self) -> None:
        await self.channel.set_qos(prefetch_count=self.settings.daemon(self.service.name).prefetch)
        # Declared (not merely looked up) on the robust channel: aio-pika declares it again after
        # the broker restarts, before the reopen callback below consumes from it again.
        self._queue = await self.channel.declare_queue(
            self.queue_name, durable=True, arguments=work_queue_arguments(self.settings, self.service.name)
        )
        await self._consume()
        if isinstance(self.channel, AbstractRobustChannel):
            self.channel.reopen_callbacks.add(self._on_reopen)
        log.info("consuming", queue=self.queue_name, daemon=self.service.name)

    async def _consume(self) -> None:
        """Consume on the underlying aiormq channel: per delivery no aio-pika message object and no
        second task (aiormq already runs each delivery in a task of its own)."""
        underlay = await self.channel.get_underlay_channel()
        # Under the lock, so a reopen and a recovery never create two consumers, and a stop never
        # cancels a basic.consume half-way (aiormq closes the channel on a cancelled RPC).
        async with self._consume_lock:
            if self._stopping or (self._tag is not None and _has_consumer(underlay, self._tag)):
                return
            if self.acks is None or self.acks.channel is not underlay:
                # Tags count per channel. On the same channel (consuming again after a broker
                # cancel) the window goes on: a second one's multiple acks would cover the first's.
                self.acks = self.ack_window(underlay)
            self._underlay = underlay
            # aiormq's hook for a Basic.Cancel sent by the broker (a set: added once per channel).
            underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
            # The tag (aiormq's format) is known before the RPC: the broker's Basic.Cancel may be
            # read right after the ConsumeOk, before this task resumes.
            self._tag = f"ctag{underlay.number}.{uuid.uuid4().hex}"
            await underlay.basic_consume(self.queue_name, self.deliver, consumer_tag=self._tag)

    def ack_window(self, channel: aiormq.abc.AbstractChannel) -> AckWindow:
        """The ack window of a new channel: ``common.bus.acks``' defaults (an extension point)."""
        return AckWindow(channel)

    async def _on_reopen(self, _channel: Any) -> None:
        """The robust channel came back (reconnection, or a channel error): its unacked messages are
        back in the queue, and aio-pika restores only the consumers it created itself."""
        if self._tag is not None:  # still meant to consume (not stopping)
            await self._consume()

    def _on_broker_cancel(self, frame: Basic.Cancel) -> None:
        """The broker cancelled a consumer of this channel. Called from aiormq's channel reader, so
        the recovery runs in a task of its own: its RPCs need that reader."""
        if self._stopping or frame.consumer_tag != self._tag:
            return  # stopping, or a consumer this runner has replaced
        self.stats.cancelled_by_broker += 1
        log.error(
            "consumer_cancelled_by_broker", queue=self.queue_name, daemon=self.service.name,
            consumer_tag=frame.consumer_tag, in_flight=self.in_flight,
        )  # fmt: skip
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        """Declare the daemon's queues again and consume, with a backoff, until it works or the
        runner stops."""
        delay = RECOVERY_DELAY
        attempt = 1
        while True:
            # A pause first: whoever deleted the queue may be re-creating it, and the broker may
            # still be removing it.
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                await self._declare_again()
                await self._consume()
            except Exception as exc:
                delay = min(delay * 2, RECOVERY_MAX_DELAY)
                log.error(
                    "consumer_recovery_failed", queue=self.queue_name, daemon=self.service.name,
                    attempt=attempt, retry_in=delay,
                    error=exc.message if isinstance(exc, SpoolError) else repr(exc),
                )  # fmt: skip
                attempt += 1
                continue
            if self.consuming:  # else stopping meanwhile
                log.info(
                    "consumer_recovered", queue=self.queue_name, daemon=self.service.name, attempts=attempt
                )
            return

    async def _declare_again(self) -> None:
        """The daemon's exchange, queues and bindings, as at start (a deleted queue lost its
        bindings too), and only its own: another daemon's queue deleted on purpose stays deleted.

        On a plain channel of its own: a refusal (PRECONDITION_FAILED for a queue re-created with
        other arguments) closes that channel, not the consuming one, and a robust channel would
        reopen itself after it.
        """
        # aio-pika has no public way from a channel to its connection, and ``Process`` gives the
        # runner only its channel.
        connection = cast(aio_pika.Channel, self.channel)._connection
        async with (
            asyncio.timeout(RECOVERY_ATTEMPT_TIMEOUT),
            aio_pika.Channel(connection, publisher_confirms=False) as channel,
        ):
            await declare_topology(channel, self.settings, [self.service.name])

    @property
    def consuming(self) -> bool:
        """Whether a consumer of this runner is registered on its current channel."""
        underlay, tag = self._underlay, self._tag
        return (
            underlay is not None
            and tag is not None
            and not underlay.is_closed
            and _has_consumer(underlay, tag)
        )

    async def stop_consuming(self) -> None:
        self._stopping = True
        async with self._consume_lock:  # lets a basic.consume under way finish (see ``_consume``)
            recovery, self._recovery = self._recovery, None
            if recovery is not None:
                recovery.cancel()
        if recovery is not None:
            await asyncio.gather(recovery, return_exceptions=True)
        underlay, tag = self._underlay, self._tag
        if underlay is not None and tag is not None and _has_consumer(underlay, tag):
            try:
                await underlay.basic_cancel(tag)
            except Exception as exc:  # broker already gone: nothing more will arrive anyway
                log.warning("cancel_failed", queue=self.queue_name, error=repr(exc))
        self._tag = None

    async def drain(self, grace: float) -> None:
        """Let in-flight handlers finish within ``grace``; the rest is cancelled and requeued."""
        if self._tasks:
            log.info("draining", daemon=self.service.name, in_flight=len(self._tasks), grace=grace)
            _done, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            # Named by their message ids (``deliver``): what a stop that overruns names.
            self.abandoned = sorted(task.get_name() for task in pending)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        await self._flush_acks()
        if not self.channel.is_closed:
            await self.channel.close()  # the broker requeues whatever is still unacked

    async def _flush_acks(self) -> None:
        if self.acks is not None and not self.acks.channel.is_closed:
            try:
                await self.acks.flush()
            except Exception as exc:  # channel gone meanwhile: the broker requeued them
                log.warning("ack_failed", error=repr(exc))

    async def queue_depth(self) -> int:
        """Messages ready in the work queue now (a fresh declare-ok, not a cached one)."""
        assert self._queue is not None
        result = await self._queue.declare()
        return result.message_count or 0

    @property
    def in_flight(self) -> int:
        """Handlers running now (an extension point: see the class docstring)."""
        return len(self._tasks)

    @property
    def busy(self) -> int:
        """Deliveries still being worked on (an extension point: see the class docstring)."""
        return self.in_flight

    def oldest_delivery(self) -> tuple[float, str] | None:
        """(seconds held, what) of the delivery held longest by a running handler, or None."""
        for started, what in self._since.values():
            return time.monotonic() - started, what
        return None

    # --- per delivery ---------------------------------------------------------------------------
    async def deliver(self, message: DeliveredMessage) -> None:
        """Run the service's handler for one delivery and settle it (an extension point)."""
        task = asyncio.current_task()
        assert task is not None
        delivery = Delivery(message)
        task.set_name(delivery.properties.message_id or f"delivery-{delivery.tag}")
        acks = self.acks
        if acks is None or acks.channel is not message.channel:
            acks = None  # from a channel replaced meanwhile: its tags mean nothing on the new one
        else:
            acks.delivered(delivery.tag)
        delivery.acks = acks
        self._tasks.add(task)
        try:
            async with self._limit:
                self._since[task] = (time.monotonic(), f"{delivery.routing_key} {task.get_name()}")
                await self._handle(delivery)
        finally:
            self._tasks.discard(task)
            self._since.pop(task, None)

    def _context(
        self,
        attempt: int,
        correlation_id: str | None,
        reply_to: str | None = None,
        user_id: str | None = None,
    ) -> Context[Any]:
        return Context(
            daemon=self.service.name, settings=self.settings, publisher=self.publisher,
            resources=self.resources, log=self._log, attempt=attempt, correlation_id=correlation_id,
            reply_to=reply_to, user_id=user_id,
        )  # fmt: skip

    async def _handle(self, delivery: Delivery) -> None:
        props = delivery.properties
        sender = delivery.sender = admission.sender_of(props, self._trusted)
        attempt = admission.attempt_of(props, sender)
        routing_key = admission.routing_key_of(props, delivery.routing_key, sender)
        try:
            # Who may send what, and where replies may go, before anything reads the body.
            admission.check(routing_key, props, sender, self.settings.bus)
            route = self.service.routes.get(routing_key)
            handler = route.handler if route is not None else self.service.fallback
            if handler is None:
                raise InvalidMessage(
                    codec.UNKNOWN_TYPE, f"{self.service.name} has no handler for {routing_key!r}"
                )
            msg = codec.decode(delivery.body, props.content_type, routing_key, props.message_id)
        except Exception as exc:  # undecodable / invalid: straight to the runner's verdict
            with bound_contextvars(
                daemon=self.service.name, message_id=props.message_id, attempt=attempt,
                correlation_id=props.correlation_id,
            ):  # fmt: skip
                ctx = self._context(attempt, props.correlation_id, user_id=sender.user_id)
                if self.service.on_malformed is not None:
                    await self._ignore_malformed(delivery, exc, routing_key, ctx)
                else:
                    await self._failed(delivery, None, exc, attempt, routing_key, ctx)
            return
        # One binding per message (it is on the hot path): every line logged while handling it,
        # by the handler or by the runner, carries these fields.
        ctx = self._context(attempt, props.correlation_id or msg.id, props.reply_to, sender.user_id)
        described = self.service.describe(msg)
        if (task := asyncio.current_task()) in self._since and described:
            about = " ".join(f"{k}={v}" for k, v in described.items() if v is not None)
            self._since[task] = (self._since[task][0], f"{routing_key} {msg.id} {about}".rstrip())
        with bound_contextvars(
            daemon=self.service.name, message_id=msg.id, attempt=attempt, correlation_id=ctx.correlation_id,
            **described,
        ):  # fmt: skip
            started = time.perf_counter()
            try:
                await handler(msg, ctx)
            except asyncio.CancelledError:
                raise  # stopping: leave unacked, the broker requeues it
            except Exception as exc:
                self.stats.handling.observe(time.perf_counter() - started)
                await self._failed(delivery, msg, exc, attempt, routing_key, ctx)
                return
        self.stats.handling.observe(time.perf_counter() - started)
        await self._settle(delivery)
        self.stats.processed += 1

    async def _failed(
        self,
        delivery: Delivery,
        msg: Message | None,
        exc: Exception,
        attempt: int,
        routing_key: str,
        ctx: Context[Any],
    ) -> None:
        decision = decide(exc, attempt, self.settings.bus)
        err = classify(exc)
        self._log_failure(decision, err, attempt, exc)
        if self.service.on_failure is not None:
            try:
                await self.service.on_failure(msg, err, attempt, decision.action == "dead", ctx)
            except Exception as hook_exc:  # recording must never decide the message's fate
                log.error("failure_hook_failed", error=repr(hook_exc))
        copy = _copy_with_headers(
            delivery, routing_key, decision, attempt, self.service.name, self.queue_name
        )
        target = (
            self.settings.retry_queue(self.service.name, decision.tier or 0)
            if decision.action == "retry"
            else self.settings.dead_queue(self.service.name)
        )
        try:
            if decision.action == "dead":
                # Before the dead letter and the ack: a broker outage requeues the message and
                # the redelivery announces it again, under the same id (at least once, never lost).
                await self._announce_failure(msg, decision, attempt, delivery)
            await self.publisher.publish_raw(target, copy)
        except SpoolError as pub_exc:
            log.error("cannot_park_message", target=target, error=pub_exc.message)
            await asyncio.sleep(1)  # avoid a hot redelivery loop while the broker misbehaves
            await self._settle(delivery, requeue=True)
            return
        if decision.action == "dead":
            self.stats.dead += 1
            self.stats.dead_by_reason[decision.reason] += 1
        else:
            self.stats.retried += 1
            self.stats.retried_by_reason[decision.reason] += 1
        await self._settle(delivery)

    async def _ignore_malformed(
        self, delivery: Delivery, exc: Exception, routing_key: str, ctx: Context[Any]
    ) -> None:
        """An observer's verdict on what it cannot read: counted by its hook, acked, never parked."""
        assert self.service.on_malformed is not None
        err = classify(exc)
        self.stats.ignored += 1
        self._folded.warning(
            f"ignored:{err.reason}", "malformed_ignored", exc=exc,
            reason=err.reason, error=err.message, routing_key=routing_key,
        )  # fmt: skip
        try:
            await self.service.on_malformed(routing_key, err, ctx)
        except Exception as hook_exc:  # counting must never block the queue
            log.error("malformed_hook_failed", error=repr(hook_exc))
        await self._settle(delivery)

    def _log_failure(self, decision: Decision, err: SpoolError, attempt: int, exc: Exception) -> None:
        # The first exception of each type is written whole even within its reason's window.
        event = "dead_lettered" if decision.action == "dead" else "retrying"
        fields: dict[str, Any] = {"reason": decision.reason, "error": err.message, "attempt": attempt}
        if decision.action == "retry":
            fields["delay"] = decision.delay
        if err.reason == UNEXPECTED:
            fields["exc_info"] = exc
        level = "error" if err.reason == UNEXPECTED or decision.action == "dead" else "warning"
        self._folded.log(level, f"{decision.action}:{decision.reason}", event, exc=exc, **fields)

    async def _announce_failure(
        self, msg: Message | None, decision: Decision, attempt: int, delivery: Delivery
    ) -> None:
        """``file.failed``; raises when the broker did not take it (the caller requeues). Its id
        names the fact (daemon, failed message, attempt): the same on every redelivery."""
        message_id = msg.id if msg else delivery.properties.message_id
        about = message_id or hashlib.sha1(delivery.body).hexdigest()
        event = FileFailed(
            id=fact_id("file.failed", self.service.name, about, str(attempt)),
            daemon=self.service.name,
            reason=decision.reason,
            error=decision.error[:MAX_ERROR_TEXT],
            attempts=attempt,
            name=getattr(msg, "name", None),
            path=getattr(msg, "path", None),
            dataset=getattr(msg, "dataset", None),
            message_id=message_id,
            endpoint=getattr(msg, "destination", None) or getattr(msg, "storage", None),
        )
        try:
            await self.publisher.publish(event, correlation_id=delivery.properties.correlation_id)
        except SpoolError as exc:
            if exc.reason != "unroutable":
                raise
            # Nobody is bound (the monitor's queue was deleted): keeping the message would loop.
            log.warning("file_failed_event_unroutable", error=exc.message)

    async def _settle(self, delivery: Delivery, requeue: bool = False) -> None:
        """Ack (coalesced with its neighbours) or requeue; a closed channel means the broker
        already requeued it."""
        try:
            if delivery.acks is None:  # its channel is gone: nothing to settle on the new one
                return
            if requeue:
                await delivery.acks.nack(delivery.tag, requeue=True)
            else:
                delivery.acks.ack(delivery.tag)
        except Exception as exc:
            log.warning("settle_failed", error=repr(exc), requeue=requeue)


def _copy_with_headers(
    delivery: Delivery,
    routing_key: str,
    decision: Decision,
    attempt: int,
    daemon: str,
    queue: str,
) -> aio_pika.Message:
    sender = delivery.sender
    assert sender is not None
    headers = admission.spool_headers_of(delivery.properties, sender)
    headers[H.SENDER] = sender.user_id or ""  # the copy is published by Spool, not from Spool
    headers[H.ROUTING_KEY] = routing_key
    headers[H.REASON] = decision.reason
    headers[H.ERROR] = decision.error[:MAX_ERROR_TEXT]
    if decision.action == "retry":
        headers[H.ATTEMPT] = attempt + 1
    else:
        headers.update(
            {
                H.ATTEMPTS: attempt,
                H.DAEMON: daemon,
                H.HOST: HOST,
                H.QUEUE: queue,
                H.TIME: datetime.now(UTC).isoformat(),
            }
        )
    expiration = decision.delay if decision.action == "retry" else None  # jittered: see retry.py
    return copy_of(delivery.body, delivery.properties, headers, expiration=expiration)


def _has_consumer(channel: aiormq.abc.AbstractChannel, tag: str) -> bool:
    """``tag`` consumes on ``channel``. aiormq drops a tag from ``consumers`` (on its ``Channel``,
    not the abstract one) when the broker cancels it."""
    return tag in cast(aiormq.Channel, channel).consumers
