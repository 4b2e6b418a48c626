"""Connecting to RabbitMQ: one robust connection per process, reconnecting when the broker restarts."""

from __future__ import annotations

import asyncio

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from common.config import BusSettings
from common.errors import Retryable


async def connect(bus: BusSettings, *, name: str = "spool") -> AbstractRobustConnection:
    """Open a robust connection; raise ``Retryable('broker_unreachable')`` if the first try fails.

    After the first success aio-pika's robust connection re-opens channels, re-declares queues and
    restarts consumers by itself when the broker comes back, so daemons survive broker restarts.
    """
    try:
        return await asyncio.wait_for(
            aio_pika.connect_robust(
                bus.url,
                client_properties={"connection_name": name},
                reconnect_interval=2,
            ),
            timeout=bus.connect_timeout,
        )
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
        raise Retryable(
            "broker_unreachable", f"cannot reach RabbitMQ at {_redact(bus.url)}: {exc or type(exc).__name__}"
        ) from None


def _redact(url: str) -> str:
    """Hide the password in messages shown to operators."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url
