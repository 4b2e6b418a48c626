"""Publishing CloudEvents as an external system would (``spool ingest``, the demo, benchmarks).

Plain JSON on the ``spool`` exchange with ``content_type = application/cloudevents+json`` and the
event type as routing key: exactly the contract a DAQ without Python follows. Confirms are
pipelined in a sliding window so a night of events publishes at broker speed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustConnection
from pamqp.commands import Basic

from common.codec import CLOUDEVENTS_JSON
from common.config import Settings
from common.errors import Permanent, Retryable

PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)


async def declare_if_allowed(connection: AbstractRobustConnection, settings: Settings) -> bool:
    """Declare Spool's exchange and queues when this broker user may; whether it could.

    A file announced before ingest ever ran then waits in ingest's queue. An external publisher
    (``spool broker setup``) may configure nothing but its reply queues: for it the topology is
    the daemons' business, and the publish checks the exchange passively instead. A plain channel,
    since the refusal closes it (a robust one would reopen itself).
    """
    from common.bus.topology import declare_topology

    channel = aio_pika.Channel(connection)
    await channel
    try:
        await declare_topology(channel, settings)
    except aiormq.exceptions.ChannelAccessRefused:
        return False
    await channel.close()
    return True


async def publish_cloudevents(
    connection: AbstractRobustConnection,
    exchange_name: str,
    events: Iterable[dict[str, Any]],
    *,
    window: int = 256,
    on_sent: Callable[[int], None] | None = None,
    reply_to: str | None = None,
    user_id: str | None = None,
) -> int:
    """Publish every event (confirmed, mandatory); return how many were sent.

    At most ``window`` events are awaiting their confirm at any time (a sliding window: the next
    event goes out as soon as one is confirmed, not when the whole window is). The first event
    that is returned unroutable or not confirmed stops the publishing: those in flight are waited
    for, and ``Retryable("publish_failed")`` says how many failed. ``on_sent`` hears the count of
    confirmed events every ``window`` confirms and at the end.
    """
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    confirmed = 0
    errors: list[BaseException] = []
    in_flight: set[asyncio.Future[Any]] = set()

    def settle(done: Iterable[asyncio.Future[Any]]) -> None:
        nonlocal confirmed
        for fut in done:
            exc = fut.exception()
            if exc is None:
                confirmed += 1
                if on_sent and confirmed % window == 0:
                    on_sent(confirmed)
            else:
                errors.append(exc)

    try:
        try:  # passive: needs no permission, and a clear error if the exchange is missing
            await channel.get_exchange(exchange_name, ensure=True)
        except aio_pika.exceptions.ChannelNotFoundEntity as exc:
            raise Retryable(
                "exchange_missing",
                f"{exc}: start a daemon or run `spool broker declare` to create exchange {exchange_name!r}",
            ) from None
        # Straight on the aiormq channel with pamqp properties: aio-pika's message objects and
        # per-publish checks were most of this loop's CPU, on the cores the daemons need.
        underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
        for event in events:
            if len(in_flight) >= window:
                done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                settle(done)
            if errors:
                break
            properties = Basic.Properties(
                content_type=CLOUDEVENTS_JSON,
                message_id=str(event["id"]),
                delivery_mode=PERSISTENT,
                reply_to=reply_to,
                # The connection's user: RabbitMQ refuses any other, so ingest knows who announced
                # (``landing_publishers``: a source announces only in its own landing area).
                user_id=user_id,
            )
            publish = underlay.basic_publish(
                json.dumps(event).encode(), exchange=exchange_name, routing_key=event["type"],
                properties=properties, mandatory=True, wait=False,
            )  # fmt: skip
            in_flight.add(asyncio.ensure_future(publish))
        if in_flight:
            done, _ = await asyncio.wait(in_flight)
            settle(done)
    finally:
        for fut in in_flight:  # cancelled or failed midway: nobody is left waiting on them
            fut.cancel()
        await channel.close()
    refused = next((e for e in errors if isinstance(e, aiormq.exceptions.ChannelAccessRefused)), None)
    if refused is not None:  # the broker's permissions say no: trying again will not help
        raise Permanent(
            "publish_refused", f"RabbitMQ refused the publish ({confirmed} were sent before): {refused}"
        )
    if errors:
        raise Retryable(
            "publish_failed",
            f"{len(errors)} events not confirmed ({confirmed} were, the rest not sent): {errors[0]!r}",
        )
    if on_sent:
        on_sent(confirmed)
    return confirmed
