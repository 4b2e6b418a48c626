"""Publishing CloudEvents as an external system would (``spool ingest``, the demo, benchmarks).

Plain JSON on the ``spool`` exchange with ``content_type = application/cloudevents+json`` and the
event type as routing key: exactly the contract a DAQ without Python follows. Confirms are
pipelined in windows so a night of events publishes at broker speed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from common.codec import CLOUDEVENTS_JSON
from common.errors import Retryable


async def publish_cloudevents(
    connection: AbstractRobustConnection,
    exchange_name: str,
    events: Iterable[dict[str, Any]],
    *,
    window: int = 256,
    on_sent: Callable[[int], None] | None = None,
    reply_to: str | None = None,
) -> int:
    """Publish every event (confirmed, mandatory); return how many were sent."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    sent = 0
    try:
        exchange = await channel.get_exchange(exchange_name, ensure=True)
        batch: list[asyncio.Future[Any]] = []
        for event in events:
            message = aio_pika.Message(
                json.dumps(event).encode(),
                content_type=CLOUDEVENTS_JSON,
                message_id=str(event["id"]),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                reply_to=reply_to,
            )
            batch.append(
                asyncio.ensure_future(exchange.publish(message, routing_key=event["type"], mandatory=True))
            )
            if len(batch) >= window:
                sent += await _settle(batch)
                batch = []
                if on_sent:
                    on_sent(sent)
        sent += await _settle(batch)
        if on_sent:
            on_sent(sent)
    finally:
        await channel.close()
    return sent


async def _settle(batch: list[asyncio.Future[Any]]) -> int:
    results = await asyncio.gather(*batch, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise Retryable(
            "publish_failed", f"{len(errors)} of {len(batch)} events not confirmed: {errors[0]!r}"
        )
    return len(batch)
