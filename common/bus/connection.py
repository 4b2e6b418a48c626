"""Connecting to RabbitMQ: one robust connection per process, reconnecting when the broker restarts
and, with a cluster (``bus.urls``), moving to another node when its node goes.

aio-pika's ``RobustConnection`` reconnects to the one URL it was given (mosquito/aio-pika#141 is
open; #680, a multi-host connection class, was closed unmerged). ``ClusterConnection`` is the
smallest change that makes it try the others: aio-pika calls ``_on_connection_close`` both when an
established connection is lost and when a connection attempt fails (``UnderlayConnection.connect``
hands the failure to the close callback), and each attempt connects to ``self.url``; so moving
``self.url`` to the next node there makes every later attempt go to the next node in turn, and the
robust connection's own machinery (reopening channels, re-declaring queues, restarting consumers,
``reconnect_callbacks``) works unchanged on whichever node answers.

Order: each process shuffles the nodes once, then goes round that order. Shuffled rather than as
listed so that the daemons of a site spread over the nodes (a node's loss then moves a third of
the connections, not all of them, and no node carries every connection while the others idle);
quorum queues are reachable from any node, so which node a client sits on does not change what it
sees. A site that wants an order (a node on the same host first) lists only that node in ``url``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractRobustConnection
from aio_pika.connection import make_url
from yarl import URL

from common.bus import tls
from common.config import BusSettings
from common.errors import Retryable

log = structlog.get_logger("spool.bus")
RECONNECT_INTERVAL = 2  # seconds between the robust connection's attempts once it was up
# Seconds between losing a node and opening channels on the next one. Measured on RabbitMQ 3.10.8
# (three nodes on one machine, the queues' leader SIGKILLed): a channel that first published to a
# quorum queue 0.1 s after its leader died had every later publish to that queue nacked (still
# after 150 s), while channels opened from 0.5 s on worked; the daemon reconnects in ~0.15 s, so
# without this pause its publisher was such a channel for the whole outage.
NODE_LOSS_SETTLE = 3.0
# What connecting can fail with (aio-pika's own list: AMQP and socket errors, and a RuntimeError
# or StopAsyncIteration for a connection closed half-way through the handshake), and a timeout.
CONNECT_ERRORS = (*aio_pika.exceptions.CONNECTION_EXCEPTIONS, TimeoutError)


class ClusterConnection(aio_pika.RobustConnection):
    """A robust connection over several nodes: after a lost connection or a failed attempt, the
    next attempt goes to the next URL of ``urls`` (round the list). With one URL, exactly aio-pika's
    ``RobustConnection``."""

    def __init__(self, urls: Sequence[URL], **kwargs: Any) -> None:
        super().__init__(urls[0], **kwargs)
        self.urls = list(urls)
        self._at = 0
        self._settle_until = 0.0  # loop time before which no channel is restored (a node was lost)

    async def _on_connected(self) -> None:
        # Connected to the next node: its channels (consumers, the publisher) are restored only
        # once the cluster has had ``NODE_LOSS_SETTLE`` s to elect the lost node's queues' leaders.
        if (wait := self._settle_until - self.loop.time()) > 0:
            await asyncio.sleep(wait)
        await super()._on_connected()

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        was_connected = self.connected.is_set()
        lost = self.url
        await super()._on_connection_close(closing)
        if self._close_called or self.is_closed or len(self.urls) < 2:
            return
        # After the parent's call: its log line still names the node that went. Nothing awaits
        # between its waking the reconnection task and this, so the next attempt sees the move.
        self._at = (self._at + 1) % len(self.urls)
        self.url = self.urls[self._at]
        if was_connected:
            self._settle_until = self.loop.time() + NODE_LOSS_SETTLE
            log.warning("broker_node_lost", node=_redact(str(lost)), next=_redact(str(self.url)))


async def connect(bus: BusSettings, *, name: str = "spool") -> AbstractRobustConnection:
    """Open a robust connection to the first node that answers; raise ``Retryable`` if none does.

    The nodes (``bus.broker_urls()``) are tried in this process's shuffled order, each within
    ``bus.connect_timeout`` (a node that does not answer at all costs that much before the next is
    tried); the same timeout bounds every later reconnection attempt. ``broker_tls_failed`` when a
    node refused the TLS handshake (a certificate or CA problem, not a broker that is away) and no
    node could be reached, else ``broker_unreachable`` naming each node's error.

    After the first success aio-pika's robust connection re-opens channels, re-declares queues and
    restarts consumers by itself when the broker (or another node) comes back, so daemons survive
    broker restarts and, with a cluster, the loss of the node they were connected to. A first try
    that fails (refused, closed during the handshake, timed out) stops that connection's
    reconnection task, so nothing keeps trying (and logging) behind the caller's back.
    """
    urls = [make_url(u, reconnect_interval=RECONNECT_INTERVAL) for u in bus.broker_urls()]
    random.shuffle(urls)
    failures: list[tuple[URL, BaseException]] = []
    for i in range(len(urls)):
        connection = ClusterConnection(
            urls[i:] + urls[:i],
            client_properties={"connection_name": name},
            reconnect_interval=RECONNECT_INTERVAL,
            # amqps: always our context (bus.tls_*), never aio-pika's from URL options.
            ssl_context=tls.client_context(bus) if tls.is_tls(bus) else None,
        )
        try:
            await asyncio.wait_for(
                connection.connect(timeout=bus.connect_timeout), timeout=bus.connect_timeout
            )
        except CONNECT_ERRORS as exc:
            await _close_quietly(connection)
            failures.append((urls[i], exc))
            continue
        for url, error in failures:
            log.warning("broker_node_unreachable", node=_redact(str(url)), error=_describe(error))
        return connection
    raise _unreachable(bus, failures)


def _unreachable(bus: BusSettings, failures: list[tuple[URL, BaseException]]) -> Retryable:
    for url, exc in failures:
        if (failure := tls.tls_failure(exc)) is not None:
            return Retryable(
                "broker_tls_failed",
                f"TLS with RabbitMQ at {_redact(str(url))} failed: {tls.describe(failure)}"
                f" (bus.tls_ca = {bus.tls_ca or 'the system CAs'})",
            )
    detail = "; ".join(f"{_redact(str(url))}: {_describe(exc)}" for url, exc in failures)
    return Retryable("broker_unreachable", f"cannot reach RabbitMQ at {detail}")


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def _close_quietly(connection: AbstractRobustConnection) -> None:
    try:
        await connection.close()
    except (*CONNECT_ERRORS, aiormq.exceptions.AMQPError):
        pass


def _redact(url: str) -> str:
    """Hide the password in messages shown to operators (and the query aio-pika's options add)."""
    url = url.split("?", 1)[0]
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url
