"""A TCP proxy in front of the real RabbitMQ that a test can cut at a chosen moment.

Broker failures are tested against the machine's shared broker without stopping it: the daemon
under test connects through this proxy, and the proxy plays the broker's part of a failure on that
one connection. The broker behind it stays real (every byte of the handshake and of the work is
the broker's own); only the socket in between is cut.

- ``cut()``: drop every open connection now (a broker restart, a network cut).
- ``cut_on(QUEUE_DECLARE, nth=1)``: let the client's AMQP frames through until it sends the
  ``nth`` method of that kind, then close the connection instead of forwarding it. With
  ``forced=True`` the client first receives ``Connection.Close 320 CONNECTION_FORCED`` as a
  RabbitMQ node that is shutting down sends it. This picks a moment of a daemon's start-up
  precisely (declaring the topology, opening its second channel, starting to consume).
- ``refuse()`` / ``accept()``: stop / start listening on the same port (connection refused, as
  for a broker that is down).

``TcpProxy`` runs on the test's event loop (tests drive daemons with
``asyncio.create_subprocess_exec`` meanwhile); ``ThreadedTcpProxy`` runs one in a thread of its
own for synchronous tests.

    async with TcpProxy(upstream_port=5672) as proxy:
        proxy.cut_on(CHANNEL_OPEN, nth=2, then_refuse=True)
        url = proxy.url("amqp://guest:guest@127.0.0.1:5672/")
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pamqp import commands, frame

T = TypeVar("T")

# (class id, method id) of the client's AMQP methods a test may cut on.
CHANNEL_OPEN = (20, 10)
EXCHANGE_DECLARE = (40, 10)
QUEUE_DECLARE = (50, 10)
QUEUE_BIND = (50, 20)
BASIC_QOS = (60, 10)
BASIC_CONSUME = (60, 20)
BASIC_PUBLISH = (60, 40)
CONFIRM_SELECT = (85, 10)

PROTOCOL_HEADER_SIZE = 8  # b"AMQP\x00\x00\x09\x01"
FRAME_HEADER = struct.Struct(">BHI")  # type, channel, payload size; then payload and 0xCE
FRAME_METHOD = 1
SHUTDOWN_TEXT = "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"


@dataclass
class _Trigger:
    method: tuple[int, int]
    nth: int
    forced: bool
    then_refuse: bool
    after_reply: bool
    seen: int = 0


class _Link:
    """One client connection and its connection to the broker."""

    def __init__(self, proxy: TcpProxy, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.buffer = b""
        self.header_seen = False
        self.cut_after_reply: _Trigger | None = None

    def close(self, *, forced: bool = False) -> None:
        if forced and not self.client.is_closing():
            close = commands.Connection.Close(320, SHUTDOWN_TEXT, class_id=0, method_id=0)
            self.client.write(frame.marshal(close, 0))
        for writer in (self.upstream, self.client):
            if not writer.is_closing():
                # close(), not abort(): what was written (the Close frame) still goes out first.
                writer.close()

    def _method(self) -> tuple[int, int]:
        """(class id, method id) of the method frame at the start of the buffer."""
        class_id, method_id = struct.unpack_from(">HH", self.buffer, FRAME_HEADER.size)
        return class_id, method_id

    def upstream_chunk(self, data: bytes) -> bytes | None:
        """The complete frames to forward to the broker, or None when a trigger fired (the link is
        closed). Frames are followed from the first byte, so a trigger armed mid-connection is
        matched on frame boundaries."""
        self.buffer += data
        out = bytearray()
        if not self.header_seen:
            if len(self.buffer) < PROTOCOL_HEADER_SIZE:
                return b""
            out += self.buffer[:PROTOCOL_HEADER_SIZE]
            self.buffer = self.buffer[PROTOCOL_HEADER_SIZE:]
            self.header_seen = True
        while len(self.buffer) >= FRAME_HEADER.size:
            kind, _channel, size = FRAME_HEADER.unpack_from(self.buffer)
            end = FRAME_HEADER.size + size + 1
            if len(self.buffer) < end:
                break
            trigger = self.proxy._trigger
            if (
                trigger is not None
                and kind == FRAME_METHOD
                and size >= 4
                and self._method() == trigger.method
            ):
                trigger.seen += 1
                if trigger.seen == trigger.nth:
                    self.proxy._trigger = None
                    if not trigger.after_reply:
                        self.proxy._fire(self, trigger, bytes(out))
                        return None
                    self.cut_after_reply = trigger  # the broker's next bytes, then the cut
            out += self.buffer[:end]
            self.buffer = self.buffer[end:]
        return bytes(out)


class TcpProxy:
    """Forwards 127.0.0.1:<port> to the broker; cut, refuse or accept on the test's command."""

    def __init__(
        self, upstream_host: str = "127.0.0.1", upstream_port: int = 5672, *, host: str = "127.0.0.1"
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = host
        self.port = 0
        self.connections = 0  # accepted so far
        self.cuts = 0  # connections closed by cut() or a trigger
        self.fired = asyncio.Event()  # set when a cut_on trigger fired
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._trigger: _Trigger | None = None

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def url(self, amqp_url: str) -> str:
        """``amqp_url`` with its host and port replaced by the proxy's."""
        parts = urlsplit(amqp_url)
        userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return urlunsplit(parts._replace(netloc=f"{userinfo}{self.host}:{self.port}"))

    async def start(self) -> None:
        await self.accept()

    async def accept(self) -> None:
        """Listen (again, on the same port once one was chosen)."""
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
            self.port = self._server.sockets[0].getsockname()[1]

    async def refuse(self) -> None:
        """Stop listening: new connections are refused, open ones go on."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def cut(self, *, forced: bool = False) -> int:
        """Close every open connection now; the number closed."""
        links = list(self._links)
        for link in links:
            link.close(forced=forced)
        self.cuts += len(links)
        return len(links)

    def cut_on(
        self,
        method: tuple[int, int],
        nth: int = 1,
        *,
        forced: bool = True,
        then_refuse: bool = True,
        after_reply: bool = False,
    ) -> None:
        """Close the connection that sends the ``nth`` ``method`` (counted over all connections),
        without forwarding it; with ``then_refuse`` stop listening too (the broker is gone).

        With ``after_reply`` the method goes through and the connection is closed once the
        broker's answer reached the client: the client is then busy with something else (a
        daemon opening its resources after its publisher's channel, say)."""
        self._trigger = _Trigger(method, nth, forced, then_refuse, after_reply)
        self.fired.clear()

    async def close(self) -> None:
        await self.refuse()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- forwarding -------------------------------------------------------------------------------
    def _fire(self, link: _Link, trigger: _Trigger, before: bytes) -> None:
        if before:
            link.upstream.write(before)
        self._trigger = None
        self.cuts += 1
        link.close(forced=trigger.forced)
        if trigger.then_refuse and self._server is not None:
            self._server.close()  # stops accepting at once; wait_closed is left to refuse()/close()
            self._server = None
        self.fired.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            writer.close()
            return
        link = _Link(self, writer, up_writer)
        self._links.add(link)
        tasks = [
            asyncio.create_task(self._pump(reader, up_writer, link.upstream_chunk, link)),
            asyncio.create_task(self._pump(up_reader, writer, None, link, self._after_reply)),
        ]
        self._tasks.update(tasks)
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._tasks.difference_update(tasks)
            self._links.discard(link)
            link.close()

    def _after_reply(self, link: _Link) -> bool:
        """Called after bytes went from the broker to the client: cut now if a trigger waits."""
        if link.cut_after_reply is None:
            return False
        trigger, link.cut_after_reply = link.cut_after_reply, None
        self._fire(link, trigger, b"")
        return True

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        inspect: Callable[[bytes], bytes | None] | None,
        link: _Link,
        after: Callable[[_Link], bool] | None = None,
    ) -> None:
        try:
            while data := await reader.read(65536):
                if inspect is not None:
                    forward = inspect(data)
                    if forward is None:
                        return
                    data = forward
                if writer.is_closing():
                    return
                writer.write(data)
                await writer.drain()
                if after is not None and after(link):
                    return
        except (ConnectionError, OSError):
            pass
        finally:
            link.close()


class ThreadedTcpProxy:
    """A ``TcpProxy`` on an event loop of its own thread, driven from synchronous code."""

    def __init__(self, upstream_host: str = "127.0.0.1", upstream_port: int = 5672) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._thread.start()
        self.proxy: TcpProxy = self._call(self._make(upstream_host, upstream_port))
        self._call(self.proxy.start())

    @staticmethod
    async def _make(host: str, port: int) -> TcpProxy:
        return TcpProxy(host, port)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def __enter__(self) -> ThreadedTcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        return self.proxy.port

    def url(self, amqp_url: str) -> str:
        return self.proxy.url(amqp_url)

    def cut(self, *, forced: bool = False) -> int:
        return self._call(self._async(lambda: self.proxy.cut(forced=forced)))

    def cut_on(self, method: tuple[int, int], nth: int = 1, **options: bool) -> None:
        self._call(self._async(lambda: self.proxy.cut_on(method, nth, **options)))

    def refuse(self) -> None:
        self._call(self.proxy.refuse())

    def accept(self) -> None:
        self._call(self.proxy.accept())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._call(self.proxy.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    @staticmethod
    async def _async(fn: Callable[[], T]) -> T:
        return fn()
