"""Declaring the exchange and every daemon's queues, idempotently.

Every process declares the *whole* topology at start, not only its own queues: a command published
for a daemon that is not running yet (``replica.request`` before the replicator exists) then waits
in that daemon's queue instead of being returned as unroutable.

Per daemon ``d`` (``p`` = ``bus.queue_prefix``):

- ``p.d``         quorum work queue bound to the daemon's routing keys; ``x-delivery-limit`` is the
                  safety net for a process that dies holding a message (it then dead-letters into
                  ``p.d.dead``), never the retry policy; on a cluster its members (replicas) are
                  ``bus.quorum_initial_group_size`` nodes, or the broker's default (3) when unset;
- ``p.d.retry.N`` one delay queue per tier with a fixed ``x-message-ttl``; expired messages
                  dead-letter back into ``p.d`` through the default exchange, so only ``d`` sees a
                  retry (re-publishing on ``spool`` would also wake every other binding);
- ``p.d.dead``    the dead letters; browsing it with get + requeue keeps its order.

The retry and dead-letter queues ("side queues") are classic (lazy for the dead letters) on one
node, or quorum queues replicated like the work queues when ``bus.side_queues = "quorum"`` (a
cluster). A quorum retry queue dead-letters ``at-least-once`` (RabbitMQ 3.10+: the expired message
leaves the retry queue only once the work queue confirmed it; that strategy requires
``x-overflow = reject-publish``, which without a length limit never rejects). The work queues'
own dead-lettering (the delivery-limit safety net) stays RabbitMQ's default, at-most-once: their
arguments are the same whatever the side queues, so switching the side queues never touches a
work queue.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from common.config import Settings
from common.errors import ConfigError

log = structlog.get_logger("spool.bus")

# Which routing keys each daemon consumes. The monitor sees everything.
BINDINGS: Mapping[str, Sequence[str]] = {
    "ingest": ("file.ready", "dataset.close", "metadata.set"),
    "replicator": ("replica.request", "metadata.changed"),
    "tape": ("tape.archive",),
    "recall": ("recall.request",),
    "monitor": ("#",),
}

# An absent monitor must not fill the broker's disk: its queue keeps the newest events only.
MONITOR_MAX_LENGTH = 1_000_000


def work_queue_arguments(settings: Settings, daemon: str) -> dict[str, Any]:
    args: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-delivery-limit": settings.bus.delivery_limit,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": settings.dead_queue(daemon),
    }
    # Only when set: a queue declared before the setting existed has no such argument, and RabbitMQ
    # refuses a redeclaration whose arguments differ (PRECONDITION_FAILED, ``ConfigError`` below).
    args |= _replication(settings)
    if daemon == "monitor":
        args["x-max-length"] = MONITOR_MAX_LENGTH
        args["x-overflow"] = "drop-head"
    return args


def _replication(settings: Settings) -> dict[str, Any]:
    if settings.bus.quorum_initial_group_size is None:
        return {}
    return {"x-quorum-initial-group-size": settings.bus.quorum_initial_group_size}


def retry_queue_arguments(settings: Settings, daemon: str, seconds: float) -> dict[str, Any]:
    args: dict[str, Any] = {
        "x-message-ttl": int(seconds * 1000),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": settings.queue(daemon),
    }
    if settings.bus.side_queues == "quorum":
        args |= {"x-queue-type": "quorum", "x-dead-letter-strategy": "at-least-once",
                 "x-overflow": "reject-publish", **_replication(settings)}  # fmt: skip
    return args


def dead_queue_arguments(settings: Settings) -> dict[str, Any]:
    if settings.bus.side_queues == "quorum":
        return {"x-queue-type": "quorum", **_replication(settings)}
    return {"x-queue-mode": "lazy"}


async def declare_exchange(channel: AbstractChannel, settings: Settings) -> AbstractExchange:
    return await channel.declare_exchange(settings.bus.exchange, aio_pika.ExchangeType.TOPIC, durable=True)


async def declare_topology(
    channel: AbstractChannel, settings: Settings, daemons: Sequence[str] | None = None
) -> AbstractExchange:
    """Declare the exchange and the queues of ``daemons`` (default: all). Safe to call repeatedly."""
    exchange = await declare_exchange(channel, settings)
    for daemon in daemons or list(BINDINGS):
        await _declare_daemon(channel, exchange, settings, daemon)
    return exchange


async def _declare_daemon(
    channel: AbstractChannel, exchange: AbstractExchange, settings: Settings, daemon: str
) -> None:
    work = settings.queue(daemon)
    try:
        queue = await channel.declare_queue(
            work, durable=True, arguments=work_queue_arguments(settings, daemon)
        )
        for key in BINDINGS[daemon]:
            await queue.bind(exchange, routing_key=key)
        for tier, seconds in enumerate(settings.bus.retry_tiers):
            await channel.declare_queue(
                settings.retry_queue(daemon, tier),
                durable=True,
                arguments=retry_queue_arguments(settings, daemon, seconds),
            )
        await channel.declare_queue(
            settings.dead_queue(daemon), durable=True, arguments=dead_queue_arguments(settings)
        )
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        # Raised when a queue exists with other arguments, typically after retry_tiers,
        # delivery_limit or side_queues changed in the config. Deleting queues is the operator's
        # decision.
        raise ConfigError(
            f"a queue of {daemon!r} exists with other arguments than the configuration asks for "
            f"({exc}); drain and delete it (rabbitmqctl delete_queue NAME) or restore the old settings "
            "(after a change of bus.side_queues: spool broker convert-side-queues)"
        ) from None


async def delete_topology(channel: AbstractChannel, settings: Settings) -> None:
    """Remove every queue and the exchange (tests, and ``spool`` never calls it on its own)."""
    for daemon in BINDINGS:
        names = [settings.queue(daemon), settings.dead_queue(daemon)]
        names += [settings.retry_queue(daemon, t) for t in range(len(settings.bus.retry_tiers))]
        for name in names:
            await channel.queue_delete(name)
    await channel.exchange_delete(settings.bus.exchange)


async def declare_for(connection: AbstractConnection, settings: Settings, own: Sequence[str]) -> None:
    """Declare the exchange and the queues of ``own`` (must succeed), then every other daemon's
    queues as far as this broker user may.

    With one broker user for everything (``guest``, the demo) the whole topology is declared, as
    ``declare_topology`` always did. Under least privilege (``spool broker setup``) a daemon user
    may configure only its own queues: the others' are declared by their daemons and by
    ``spool broker setup --apply`` / ``spool broker declare`` (the operator user), so a refusal
    there is expected, not an error. A refusal closes the channel, so plain (not robust) channels
    are used: a robust one would reopen itself behind our back.
    """
    if len(settings.bus.urls) > 1 and settings.bus.side_queues == "classic":
        log.warning(
            "side_queues_not_replicated",
            detail="a cluster with classic retry and dead-letter queues: while the node holding them "
            'is down no retry is parked and the dead letters wait; set bus.side_queues = "quorum" '
            "(spool broker convert-side-queues)",
        )
    channel = await plain_channel(connection)
    try:
        await declare_topology(channel, settings, own)
    except aiormq.exceptions.ChannelAccessRefused as exc:
        user = settings.bus.user
        raise ConfigError(
            f"RabbitMQ refused user {user!r} to declare the queues of {'+'.join(own)} ({exc}); "
            "run it with its own user from `spool broker setup`"
        ) from None
    for daemon in (d for d in BINDINGS if d not in own):
        if channel.is_closed:
            channel = await plain_channel(connection)
        try:
            await declare_topology(channel, settings, [daemon])
        except aiormq.exceptions.ChannelAccessRefused:
            continue
    if not channel.is_closed:
        await channel.close()


async def plain_channel(connection: AbstractConnection) -> AbstractChannel:
    """A channel that stays closed when the broker closes it (a refused declaration): a robust
    one would reopen itself behind our back."""
    channel = aio_pika.Channel(connection)
    await channel
    return channel
