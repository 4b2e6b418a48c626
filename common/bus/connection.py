"""Connecting to RabbitMQ: one robust connection per process, reconnecting when the broker restarts."""

from __future__ import annotations

import asyncio

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustConnection
from aio_pika.connection import make_url

from common.bus import tls
from common.config import BusSettings
from common.errors import Retryable

RECONNECT_INTERVAL = 2  # seconds between the robust connection's attempts once it was up
# What connecting can fail with (aio-pika's own list: AMQP and socket errors, and a RuntimeError
# or StopAsyncIteration for a connection closed half-way through the handshake), and a timeout.
CONNECT_ERRORS = (*aio_pika.exceptions.CONNECTION_EXCEPTIONS, TimeoutError)


async def connect(bus: BusSettings, *, name: str = "spool") -> AbstractRobustConnection:
    """Open a robust connection; raise ``Retryable('broker_unreachable')`` if the first try fails.

    After the first success aio-pika's robust connection re-opens channels, re-declares queues and
    restarts consumers by itself when the broker comes back, so daemons survive broker restarts.
    A first try that fails (refused, closed during the handshake, ``bus.connect_timeout`` passed)
    stops the connection's reconnection task, so nothing keeps trying (and logging) behind the
    caller's back.
    """
    url = make_url(bus.url, reconnect_interval=RECONNECT_INTERVAL)
    connection = aio_pika.RobustConnection(
        url,
        client_properties={"connection_name": name},
        reconnect_interval=RECONNECT_INTERVAL,
        # amqps: always our context (bus.tls_*), never aio-pika's from URL options.
        ssl_context=tls.client_context(bus) if tls.is_tls(bus) else None,
    )
    try:
        await asyncio.wait_for(connection.connect(), timeout=bus.connect_timeout)
    except CONNECT_ERRORS as exc:
        await _close_quietly(connection)
        if (failure := tls.tls_failure(exc)) is not None:
            # A handshake refused is a certificate or CA problem, not a broker that is away.
            raise Retryable(
                "broker_tls_failed",
                f"TLS with RabbitMQ at {_redact(bus.url)} failed: {tls.describe(failure)}"
                f" (bus.tls_ca = {bus.tls_ca or 'the system CAs'})",
            ) from None
        detail = f"cannot reach RabbitMQ at {_redact(bus.url)}: {str(exc) or type(exc).__name__}"
        raise Retryable("broker_unreachable", detail) from None
    return connection


async def _close_quietly(connection: AbstractRobustConnection) -> None:
    try:
        await connection.close()
    except (*CONNECT_ERRORS, aiormq.exceptions.AMQPError):
        pass


def _redact(url: str) -> str:
    """Hide the password in messages shown to operators."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url
