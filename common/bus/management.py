"""The RabbitMQ management API, for what AMQP cannot tell: messages delivered to a consumer and not
yet acked (in flight, "claimed" work) and *who* holds them.

A passive ``queue.declare`` over AMQP only returns the ready count and the number of consumers.
The management plugin (``rabbitmq-plugins enable rabbitmq_management``, port 15672) knows the
unacked count of each queue, the consumers of each queue with their channel, the unacked count of
each channel, and the connection name each client gave itself (Spool daemons call theirs
``spool-<daemon>@<host>``). Four requests per look, whatever the number of queues:

- ``/api/queues/{vhost}``            ready / unacked / consumers per queue;
- ``/api/consumers/{vhost}``         which channel consumes which queue;
- ``/api/vhosts/{vhost}/channels``   unacked per channel, and its connection;
- ``/api/vhosts/{vhost}/connections`` the connection's client-provided name and peer host.

The broker refreshes these figures every ``collect_statistics_interval`` (5 s by default), so they
trail AMQP's by up to that much, and a queue declared a moment ago has no figures yet (``None``).
Failures surface as ``ManagementUnreachable`` whose text starts with "management API unreachable".
"""

from __future__ import annotations

import base64
import re
import ssl as ssl_module
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aiohttp

from common.config import BusSettings

DEFAULT_PORT = 15672
DEFAULT_TLS_PORT = 15671
# Spool processes name their AMQP connection "spool-<daemon>[+<daemon>...]@<host>" (common.runtime).
_SPOOL_CONNECTION = re.compile(r"spool-(?P<daemon>[\w+.-]+)@(?P<host>.+)")


class ManagementUnreachable(Exception):
    """The management API did not answer usefully; the text says why, for the operator."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"management API unreachable: {detail}")
        self.detail = detail


@dataclass(frozen=True)
class ManagementEndpoint:
    """Where the API is, for which vhost, with which credentials (never printed)."""

    base: str  # scheme://host:port, no credentials, no trailing slash
    vhost: str
    user: str = field(repr=False)
    password: str = field(repr=False)
    # https: the context that verifies the API's certificate (``bus.tls_ca``, the broker's CA);
    # None: the system's CAs.
    ssl: ssl_module.SSLContext | None = field(default=None, repr=False, compare=False)

    def api(self, path: str) -> str:
        return f"{self.base}/api/{path}"

    @property
    def vhost_q(self) -> str:
        return quote(self.vhost, safe="")


def endpoint_for(bus: BusSettings, override: str = "") -> ManagementEndpoint:
    """``derive_endpoint`` for ``bus``, verifying an https API with the broker's TLS settings
    (``bus.tls_ca``: the management listener's certificate is usually the broker's own)."""
    endpoint = derive_endpoint(bus.url, override)
    if endpoint.base.startswith("https://"):
        from common.bus.tls import client_context
        from common.errors import ConfigError

        try:
            endpoint = replace(endpoint, ssl=client_context(bus))
        except ConfigError as exc:  # callers report a bad endpoint as a ValueError, in one line
            raise ValueError(str(exc)) from None
    return endpoint


def derive_endpoint(amqp_url: str, override: str = "") -> ManagementEndpoint:
    """The management endpoint for a broker URL: same host and credentials, port 15672 (15671 and
    https for amqps), same vhost. ``override`` (``monitor.management_url``) replaces scheme, host,
    port and, when it carries them, the credentials; the vhost always comes from the AMQP URL.
    ``endpoint_for`` adds the TLS context an https endpoint is verified with."""
    amqp = urlsplit(amqp_url)
    vhost = unquote(amqp.path[1:]) if len(amqp.path) > 1 else "/"
    user = unquote(amqp.username) if amqp.username else "guest"
    password = unquote(amqp.password) if amqp.password else "guest"
    if override:
        given = urlsplit(override)
        if given.scheme not in ("http", "https") or not given.hostname:
            raise ValueError(f"monitor.management_url must be http(s)://host[:port], got {override!r}")
        port = given.port or (DEFAULT_TLS_PORT if given.scheme == "https" else DEFAULT_PORT)
        if given.username:
            user = unquote(given.username)
            password = unquote(given.password or "")
        return ManagementEndpoint(f"{given.scheme}://{_host(given.hostname)}:{port}", vhost, user, password)
    tls = amqp.scheme == "amqps"
    scheme, port = ("https", DEFAULT_TLS_PORT) if tls else ("http", DEFAULT_PORT)
    return ManagementEndpoint(
        f"{scheme}://{_host(amqp.hostname or 'localhost')}:{port}", vhost, user, password
    )


def _host(name: str) -> str:
    return f"[{name}]" if ":" in name else name


@dataclass(frozen=True)
class QueueFigures:
    name: str
    ready: int | None
    unacked: int | None
    consumers: int | None


@dataclass(frozen=True)
class Holder:
    """A consumer holding delivered, unacked messages of a queue."""

    connection: str  # the client-provided connection name, else the broker's "ip:port -> ip:port"
    daemon: str | None  # parsed from a Spool connection name
    host: str | None  # the client's host name when it gave one, else its peer address
    channel: str
    unacked: int  # the channel's unacked messages
    prefetch: int
    # The channel also consumes other queues: ``unacked`` is the channel's total, not this queue's.
    shared: bool = False


@dataclass(frozen=True)
class Snapshot:
    queues: dict[str, QueueFigures]
    holders: dict[str, list[Holder]]


class ManagementClient:
    """A small async client; one ``aiohttp`` session for its lifetime."""

    def __init__(self, endpoint: ManagementEndpoint, *, timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        token = base64.b64encode(f"{endpoint.user}:{endpoint.password}".encode()).decode()
        self._session = aiohttp.ClientSession(
            headers={"Authorization": f"Basic {token}"},
            timeout=aiohttp.ClientTimeout(total=timeout),
            # An https endpoint is always verified: its context, else the system's CAs.
            connector=aiohttp.TCPConnector(ssl=endpoint.ssl if endpoint.ssl is not None else True),
        )

    async def close(self) -> None:
        await self._session.close()

    async def __aenter__(self) -> ManagementClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def snapshot(self, names: Iterable[str]) -> Snapshot:
        """Figures and holders of the queues ``names`` (others in the vhost are ignored)."""
        wanted = set(names)
        v = self.endpoint.vhost_q
        queues = await self._get(f"queues/{v}?columns=name,messages_ready,messages_unacknowledged,consumers")
        consumers = await self._get(f"consumers/{v}")
        channels = await self._get(
            f"vhosts/{v}/channels?columns=name,messages_unacknowledged,prefetch_count,"
            "consumer_count,connection_details.name,connection_details.peer_host"
        )
        connections = await self._get(
            f"vhosts/{v}/connections?columns=name,user_provided_name,peer_host,client_properties.connection_name"
        )
        figures = {q["name"]: _figures(q) for q in queues if q.get("name") in wanted}
        return Snapshot(figures, holders_by_queue(consumers, channels, connections, wanted))

    async def listing(self, path: str) -> list[dict[str, Any]]:
        """A listing of the API (``queues/<vhost>?columns=...``), for tools and benchmarks."""
        return await self._get(path)

    async def put(self, path: str, body: Mapping[str, Any]) -> None:
        """Create or replace an object (``broker setup --apply``); errors as ``ManagementUnreachable``."""
        await self._call("PUT", path, body)

    async def delete(self, path: str) -> bool:
        """Delete an object; False when it did not exist."""
        try:
            await self._call("DELETE", path, None)
        except ManagementUnreachable as exc:
            if "(404)" in exc.detail:
                return False
            raise
        return True

    async def _call(self, method: str, path: str, body: Mapping[str, Any] | None) -> None:
        url = self.endpoint.api(path)
        try:
            async with self._session.request(method, url, json=body) as response:
                if response.status >= 400:
                    text = (await response.text())[:300]
                    who = f"user {self.endpoint.user!r}"
                    raise ManagementUnreachable(
                        f"{self.endpoint.base}: {method} {path} refused for {who}: HTTP {response.status}"
                        f" {' '.join(text.split())} ({response.status})"
                    )
        except ManagementUnreachable:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise ManagementUnreachable(f"{self.endpoint.base}: {_one_line(exc)}") from None

    async def _get(self, path: str) -> list[dict[str, Any]]:
        url = self.endpoint.api(path)
        try:
            async with self._session.get(url) as response:
                if response.status == 401:
                    raise ManagementUnreachable(
                        f"{self.endpoint.base}: user {self.endpoint.user!r} refused (401)"
                    )
                if response.status == 404:
                    raise ManagementUnreachable(
                        f"{self.endpoint.base}: no vhost {self.endpoint.vhost!r} (404)"
                    )
                if response.status >= 400:
                    raise ManagementUnreachable(f"{self.endpoint.base}: HTTP {response.status} for {path}")
                body = await response.json(content_type=None)
        except ManagementUnreachable:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise ManagementUnreachable(f"{self.endpoint.base}: {_one_line(exc)}") from None
        if not isinstance(body, list):
            raise ManagementUnreachable(f"{self.endpoint.base}: unexpected answer to {path}")
        return body


def _one_line(exc: BaseException) -> str:
    """A client error in one line; a certificate refused says so (aiohttp wraps the SSL error)."""
    from common.bus.tls import describe, tls_failure

    if (failure := tls_failure(exc)) is not None:
        return f"TLS failed: {describe(failure)}"
    return " ".join(str(exc).split()) or type(exc).__name__


def _figures(q: Mapping[str, Any]) -> QueueFigures:
    return QueueFigures(
        name=q["name"],
        ready=_int(q.get("messages_ready")),
        unacked=_int(q.get("messages_unacknowledged")),
        consumers=_int(q.get("consumers")),
    )


def holders_by_queue(
    consumers: Iterable[Mapping[str, Any]],
    channels: Iterable[Mapping[str, Any]],
    connections: Iterable[Mapping[str, Any]],
    wanted: set[str],
) -> dict[str, list[Holder]]:
    """Join consumers -> channels -> connections into the holders of each wanted queue.

    Consumers whose channel is gone are dropped: the 3.10 management database keeps stale consumer
    records of deleted quorum queues, with an empty ``channel_details``.
    """
    by_channel = {c["name"]: c for c in channels if c.get("name")}
    by_connection = {c["name"]: c for c in connections if c.get("name")}
    queues_of_channel: dict[str, set[str]] = {}
    pairs: list[tuple[str, str, int]] = []
    for consumer in consumers:
        queue = (consumer.get("queue") or {}).get("name")
        channel = (consumer.get("channel_details") or {}).get("name")
        if not queue or not channel or channel not in by_channel:
            continue
        queues_of_channel.setdefault(channel, set()).add(queue)
        if queue in wanted:
            pairs.append((queue, channel, _int(consumer.get("prefetch_count")) or 0))
    out: dict[str, list[Holder]] = {}
    seen: set[tuple[str, str]] = set()
    for queue, channel_name, prefetch in pairs:
        if (queue, channel_name) in seen:  # several consumers on one channel: one holder
            continue
        seen.add((queue, channel_name))
        channel = by_channel[channel_name]
        conn_details = channel.get("connection_details") or {}
        conn = by_connection.get(conn_details.get("name", ""), {})
        given = conn.get("user_provided_name") or (conn.get("client_properties") or {}).get("connection_name")
        match = _SPOOL_CONNECTION.fullmatch(given or "")
        out.setdefault(queue, []).append(
            Holder(
                connection=given or conn_details.get("name") or channel_name,
                daemon=match["daemon"] if match else None,
                host=match["host"] if match else (conn.get("peer_host") or conn_details.get("peer_host")),
                channel=channel_name,
                unacked=_int(channel.get("messages_unacknowledged")) or 0,
                prefetch=prefetch or _int(channel.get("prefetch_count")) or 0,
                shared=len(queues_of_channel.get(channel_name, ())) > 1,
            )
        )
    for holders in out.values():
        holders.sort(key=lambda h: -h.unacked)
    return out


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
