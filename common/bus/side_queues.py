"""Converting a deployment's retry and dead-letter queues to the type ``bus.side_queues`` asks for.

RabbitMQ cannot change a queue's type in place: a queue is deleted and declared again, and a
daemon declaring a queue that exists with other arguments is refused (``common.bus.topology``).
``spool broker convert-side-queues`` does it for every daemon, with the daemons stopped (it
refuses while a work queue has a consumer: a running daemon would park retries into a queue being
replaced), and without losing a message:

- a retry queue's messages are moved into their work queue (each is a retry that comes a little
  early; handlers are idempotent), then the queue is deleted and declared with the new arguments;
- a dead-letter queue's messages are moved into a holding queue (``<dead>.converting``, of the new
  type), the dead-letter queue is replaced, and the messages are moved back, in their order.

Every move publishes a copy with a confirm before it acks the original, so an interruption leaves
a duplicate at worst; a run after an interrupted one finds the holding queue and finishes the move
back. A queue that already has the right arguments is left alone, so running it twice is harmless.

A copy is published by the converting user, which must be one of Spool's (``bus.spool_users``), in
the way the runner copies a message (``common.bus.publisher.copy_of``): the original's publisher
goes into ``x-spool-sender``, and Spool's own headers stay only on a message that was Spool's (a
dead letter the broker dead-lettered itself is its external sender's original: its ``x-spool-*``
headers are dropped, as ``spool dead retry`` would drop them). The broker's ``x-death`` is kept,
which is what names a delivery-limit dead letter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from common.bus import admission
from common.bus import headers as H
from common.bus.publisher import connection_user, copy_of
from common.bus.topology import BINDINGS, dead_queue_arguments, plain_channel, retry_queue_arguments
from common.bus.trust import is_spool_user
from common.config import Settings

HOLDING_SUFFIX = ".converting"


class ConversionRefused(Exception):
    """The conversion cannot run now (a daemon consuming, a user not Spool's); one line."""


@dataclass
class Converted:
    """What a conversion did: queues replaced, and messages moved (by queue they left)."""

    replaced: list[str] = field(default_factory=list)
    moved: dict[str, int] = field(default_factory=dict)


async def convert(
    connection: AbstractConnection, settings: Settings, say: Callable[[str], None] = lambda _: None
) -> Converted:
    user = connection_user(connection)
    if not is_spool_user(user, settings.bus):
        raise ConversionRefused(
            f"user {user!r} is not one of bus.spool_users: its copies of the messages would look external"
        )
    await _refuse_while_consumed(connection, settings)
    done = Converted()
    for daemon in BINDINGS:
        for tier, seconds in enumerate(settings.bus.retry_tiers):
            name = settings.retry_queue(daemon, tier)
            arguments = retry_queue_arguments(settings, daemon, seconds)
            if not await _has_arguments(connection, name, arguments):
                await _replace(connection, settings, name, arguments, settings.queue(daemon), done, say)
        dead = settings.dead_queue(daemon)
        arguments = dead_queue_arguments(settings)
        holding = dead + HOLDING_SUFFIX
        if not await _has_arguments(connection, dead, arguments):
            await _declare(connection, holding, arguments)
            await _replace(connection, settings, dead, arguments, holding, done, say)
        if await _exists(connection, holding):  # this run's, or an interrupted run's
            await _move(connection, settings, holding, dead, done, say)
            await _delete(connection, holding)
    return done


async def _refuse_while_consumed(connection: AbstractConnection, settings: Settings) -> None:
    channel = await plain_channel(connection)
    try:
        for daemon in BINDINGS:
            try:
                queue = await channel.declare_queue(settings.queue(daemon), passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                channel = await plain_channel(connection)
                continue
            if queue.declaration_result.consumer_count:
                raise ConversionRefused(
                    f"{settings.queue(daemon)} has {queue.declaration_result.consumer_count} consumer(s): "
                    "stop every daemon on every node first"
                )
    finally:
        if not channel.is_closed:
            await channel.close()


async def _replace(
    connection: AbstractConnection, settings: Settings, name: str, arguments: dict[str, Any],
    keep_in: str, done: Converted, say: Callable[[str], None],
) -> None:  # fmt: skip
    """Move ``name``'s messages to ``keep_in``, then delete it and declare it with ``arguments``."""
    await _move(connection, settings, name, keep_in, done, say)
    await _delete(connection, name)
    await _declare(connection, name, arguments)
    done.replaced.append(name)
    say(f"{name}: declared again as {arguments.get('x-queue-type', 'classic')}")


async def _move(
    connection: AbstractConnection, settings: Settings, source: str, target: str,
    done: Converted, say: Callable[[str], None],
) -> None:  # fmt: skip
    user = connection_user(connection)
    channel = await connection.channel(publisher_confirms=True)
    moved = 0
    try:
        queue = await channel.get_queue(source, ensure=True)
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            copy = _copy(message, settings, user)
            await channel.default_exchange.publish(copy, routing_key=target, mandatory=True)
            await message.ack()
            moved += 1
    finally:
        await channel.close()
    if moved:
        done.moved[source] = done.moved.get(source, 0) + moved
        say(f"{source}: {moved} message(s) moved to {target}")


def _copy(message: AbstractIncomingMessage, settings: Settings, user: str | None) -> aio_pika.Message:
    sender = admission.sender_of(message.properties, settings.bus)
    headers = {
        k: v
        for k, v in (message.headers or {}).items()
        if sender.headers_trusted or not k.startswith(H.PREFIX)
    }
    if H.SENDER not in headers:
        headers[H.SENDER] = message.properties.user_id or ""
    return copy_of(message.body, message.properties, headers, user_id=user)


async def _has_arguments(connection: AbstractConnection, name: str, arguments: dict[str, Any]) -> bool:
    """Whether ``name`` can be declared with ``arguments`` (absent: declared now, so yes)."""
    channel = await plain_channel(connection)
    try:
        await channel.declare_queue(name, durable=True, arguments=arguments)
    except aiormq.exceptions.ChannelPreconditionFailed:
        return False
    if not channel.is_closed:
        await channel.close()
    return True


async def _exists(connection: AbstractConnection, name: str) -> bool:
    channel = await plain_channel(connection)
    try:
        await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    await channel.close()
    return True


async def _declare(connection: AbstractConnection, name: str, arguments: dict[str, Any]) -> None:
    channel = await plain_channel(connection)
    await channel.declare_queue(name, durable=True, arguments=arguments)
    await channel.close()


async def _delete(connection: AbstractConnection, name: str) -> None:
    """Delete ``name`` once its messages are moved; one published into it since (a daemon on a
    node not stopped) stops the conversion instead of being dropped. (``queue.delete if-empty``
    would say it in one step, but quorum queues refuse that flag.)"""
    channel = await plain_channel(connection)
    left = (await channel.declare_queue(name, passive=True)).declaration_result.message_count
    if left:
        await channel.close()
        raise ConversionRefused(f"{name} received {left} message(s) while being converted: run it again")
    await channel.queue_delete(name)
    await channel.close()
