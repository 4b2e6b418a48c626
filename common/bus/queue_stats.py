"""Every Spool queue at a glance: ready, in flight (with who holds it), retrying per tier, dead.

Two sources, merged: AMQP passive declares give exact, current ready and consumer counts of each
queue; the management API (``common.bus.management``) adds what AMQP cannot see: messages delivered
and not yet acked, and the consumers holding them. When one source fails the report still carries
what the other knows and names what is missing ("status still shows what it knows").
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection

from common.bus.connection import connect
from common.bus.management import Holder, ManagementClient, ManagementUnreachable, Snapshot, endpoint_for
from common.bus.topology import BINDINGS
from common.config import Settings
from common.errors import SpoolError


@dataclass
class RetryTier:
    queue: str
    tier: int
    delay: float  # seconds a message waits in this tier
    waiting: int | None


@dataclass
class DaemonQueues:
    """One daemon's queues. ``None`` means unknown (its source was unreachable), never zero."""

    daemon: str
    queue: str
    ready: int | None
    in_flight: int | None  # delivered to a consumer, not yet acked
    consumers: int | None
    holders: list[Holder] | None
    retrying: int | None  # sum over the retry tiers
    retry: list[RetryTier]
    dead_queue: str
    dead: int | None


@dataclass
class SourceState:
    reachable: bool
    url: str = ""
    error: str | None = None


@dataclass
class QueueReport:
    time: datetime
    queues: list[DaemonQueues]
    amqp: SourceState
    management: SourceState
    missing: list[str] = field(default_factory=list)


def queue_names(settings: Settings, daemon: str) -> list[str]:
    tiers = range(len(settings.bus.retry_tiers))
    return [
        settings.queue(daemon),
        *(settings.retry_queue(daemon, t) for t in tiers),
        settings.dead_queue(daemon),
    ]


def all_queue_names(settings: Settings) -> list[str]:
    return [name for daemon in BINDINGS for name in queue_names(settings, daemon)]


async def passive_counts(
    connection: AbstractConnection, names: list[str]
) -> dict[str, tuple[int, int] | None]:
    """(ready, consumers) of each queue by passive declare; ``None`` for a queue that does not exist.

    A passive declare of a missing queue closes the channel, so a fresh one is opened after it.
    The closed one is closed again on our side: a robust channel that the broker closed reopens
    itself, and one not closed by us stayed open on the connection for good (the monitor, which
    asks every few seconds, leaked one channel per missing queue each time).
    """
    out: dict[str, tuple[int, int] | None] = {}
    channel: AbstractChannel = await connection.channel()
    try:
        for name in names:
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                out[name] = None
                await channel.close()
                channel = await connection.channel()
                continue
            result = queue.declaration_result
            out[name] = (result.message_count or 0, result.consumer_count or 0)
    finally:
        if not channel.is_closed:
            await channel.close()
    return out


async def queue_report(
    settings: Settings,
    *,
    connection: AbstractConnection | None = None,
    management: ManagementClient | None = None,
    amqp_error: str | None = None,
) -> QueueReport:
    """Look at every queue once. ``connection`` / ``management`` are reused when given (the monitor
    keeps them open); otherwise each is opened for this look and closed again (the CLI).
    ``amqp_error``: the caller already failed to connect; AMQP is then not tried again."""
    names = all_queue_names(settings)
    if amqp_error is not None:
        amqp_state, counts = SourceState(False, error=amqp_error), None
        mgmt_state, snapshot = await _from_management(settings, management, names)
    else:  # both at once: each is a few round trips, and either may be the one timing out
        (mgmt_state, snapshot), (amqp_state, counts) = await asyncio.gather(
            _from_management(settings, management, names), _from_amqp(settings, connection, names)
        )
    report = QueueReport(datetime.now(UTC), [], amqp_state, mgmt_state)
    if snapshot is None:
        report.missing.append(f"in-flight counts and their holders ({mgmt_state.error})")
    if counts is None:
        what = (
            "queue counts" if snapshot is None else "current ready counts (management figures, up to 5 s old)"
        )
        report.missing.append(f"{what} ({amqp_state.error})")
    for daemon in BINDINGS:
        report.queues.append(_merge(settings, daemon, snapshot, counts))
    return report


async def _from_management(
    settings: Settings, client: ManagementClient | None, names: list[str]
) -> tuple[SourceState, Snapshot | None]:
    try:
        endpoint = endpoint_for(settings.bus, settings.monitor.management_url)
    except ValueError as exc:
        return SourceState(False, settings.monitor.management_url, f"management API unreachable: {exc}"), None
    own = client is None
    active = client or ManagementClient(endpoint, timeout=settings.monitor.management_timeout)
    try:
        snapshot = await active.snapshot(names)
        return SourceState(True, endpoint.base), snapshot
    except ManagementUnreachable as exc:
        return SourceState(False, endpoint.base, str(exc)), None
    finally:
        if own:
            await active.close()


async def _from_amqp(
    settings: Settings, connection: AbstractConnection | None, names: list[str]
) -> tuple[SourceState, dict[str, tuple[int, int] | None] | None]:
    own = connection is None
    try:
        active = connection or await connect(settings.bus, name="spool-status")
    except SpoolError as exc:
        return SourceState(False, error=exc.message), None
    try:
        counts = await asyncio.wait_for(passive_counts(active, names), timeout=settings.bus.connect_timeout)
        return SourceState(True), counts
    except (TimeoutError, aio_pika.exceptions.AMQPError, OSError) as exc:
        return SourceState(False, error=f"broker did not answer: {exc or type(exc).__name__}"), None
    finally:
        if own:
            await active.close()


def _merge(
    settings: Settings,
    daemon: str,
    snapshot: Snapshot | None,
    counts: dict[str, tuple[int, int] | None] | None,
) -> DaemonQueues:
    def ready(name: str) -> int | None:
        if counts is not None:
            found = counts.get(name)
            return found[0] if found else None
        fig = snapshot.queues.get(name) if snapshot else None
        return fig.ready if fig else None

    def consumers(name: str) -> int | None:
        if counts is not None:
            found = counts.get(name)
            return found[1] if found else None
        fig = snapshot.queues.get(name) if snapshot else None
        return fig.consumers if fig else None

    work = settings.queue(daemon)
    tiers = [
        RetryTier(settings.retry_queue(daemon, t), t, delay, ready(settings.retry_queue(daemon, t)))
        for t, delay in enumerate(settings.bus.retry_tiers)
    ]
    waiting = [t.waiting for t in tiers]
    fig = snapshot.queues.get(work) if snapshot else None
    return DaemonQueues(
        daemon=daemon,
        queue=work,
        ready=ready(work),
        in_flight=fig.unacked if fig else None,
        consumers=consumers(work),
        holders=snapshot.holders.get(work, []) if snapshot else None,
        retrying=None if any(w is None for w in waiting) else sum(w for w in waiting if w is not None),
        retry=tiers,
        dead_queue=settings.dead_queue(daemon),
        dead=ready(settings.dead_queue(daemon)),
    )
