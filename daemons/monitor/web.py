"""The monitor's HTTP side: ``/metrics`` (Prometheus), ``/api/status`` (JSON), ``/`` (dashboard),
and the catalogue's read-only query API under ``/api/v1`` (``daemons.monitor.api``).

Read-only and cheap: every answer but the query API's is computed from the in-memory state. ``/api/status`` is
computed at most once per ``STATUS_MAX_AGE`` and the same bytes served to every viewer meanwhile:
fifty dashboards open in a control room must not cost fifty times the work, nor slow the counting
(the monitor's one event loop does both). The page itself is a constant.

Exposure (see ``common.config.MonitorSettings``):

- With a token, every path but ``/metrics`` when ``metrics_public`` answers only requests that
  carry it: ``Authorization: Bearer <token>`` (``spool status``, Prometheus, curl) or HTTP Basic
  with the token as password and any user name (the browser's own prompt, which then sends it with
  the dashboard's requests). Compared in constant time. Otherwise ``401`` with both challenges.
- Every answer, errors included, carries security headers: a Content-Security-Policy allowing
  only the page's own script, style and ``/api/status`` (no inline script or style), no framing,
  no MIME sniffing, no referrer, and ``Cache-Control: no-store`` (live figures, maybe private).
- A connection may stay idle, or take to send one request's headers, at most ``request_timeout``
  seconds (aiohttp's keep-alive timer runs from the connection's start and from each answer, and
  closes a connection whose next request is not complete by then: a client trickling header bytes
  is cut). Request lines and headers are bounded (``MAX_LINE``, ``MAX_HEADERS``), bodies refused
  beyond ``MAX_BODY`` (no path takes one), and at most ``MAX_CONNECTIONS`` are served at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import hmac
import ipaddress
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from common.errors import ConfigError
from common.log_folding import ReasonThrottle
from daemons.monitor.api import QueryApi
from daemons.monitor.dashboard import PAGE, SCRIPT, STYLE

log = structlog.get_logger("spool.monitor")

# Seconds one computed /api/status is served for. The dashboard polls every 2 s; the figures behind
# it (heartbeats, queue looks) change on the scale of seconds anyway.
STATUS_MAX_AGE = 1.0
# Request line, one header field, number of header fields, body: bounds on what a client may send.
MAX_LINE = 4096
MAX_FIELD = 4096
MAX_HEADERS = 64
MAX_BODY = 1024
REQUEST_TIMEOUT = 10.0
# Connections served at once; beyond, a new one is closed at once. Fifty open dashboards use fifty;
# a flood of idle connections must not take the file descriptors the monitor's bus work needs.
MAX_CONNECTIONS = 256

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Resource-Policy": "same-origin",
}
CHALLENGES = ('Bearer realm="spool-monitor"', 'Basic realm="spool-monitor", charset="UTF-8"')


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps the monitor to this machine. A name other than
    ``localhost`` counts as not loopback (it may resolve to anything)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class WebServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        status: Callable[[], dict[str, Any]],
        *,
        status_max_age: float = STATUS_MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
        token: str | None = None,
        metrics_public: bool = False,
        request_timeout: float = REQUEST_TIMEOUT,
        api: QueryApi | None = None,
    ) -> None:
        self._registry = registry
        self._status = status
        self._max_age = status_max_age
        self._clock = clock
        self._status_body: bytes | None = None
        self._status_at = 0.0
        self.status_computations = 0  # how often the document was built (tests, and curiosity)
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self.port: int | None = None
        self._token = None if token is None else token.encode()
        self._open_paths = frozenset({"/metrics"} if metrics_public else ())
        self._request_timeout = request_timeout
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY)
        app.on_response_prepare.append(_secure)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/status", self._api_status)
        app.router.add_get("/", self._dashboard)
        app.router.add_get("/dashboard.js", self._asset(SCRIPT, "text/javascript"))
        app.router.add_get("/dashboard.css", self._asset(STYLE, "text/css"))
        self._api = api
        if api is not None:
            api.add_openapi(app.router)
            api.add_routes(app.router)
        self._app = app

    @property
    def protected(self) -> bool:
        """Whether requests need the token."""
        return self._token is not None

    async def start(self, host: str, port: int) -> None:
        """Listen, or raise ``ConfigError`` naming the setting to change when the port is taken."""
        limits: dict[str, Any] = {
            "access_log": None, "keepalive_timeout": self._request_timeout, "max_line_size": MAX_LINE,
            "max_field_size": MAX_FIELD, "max_headers": MAX_HEADERS,
            "lingering_time": min(2.0, self._request_timeout),
        }  # fmt: skip
        runner = web.AppRunner(self._app, **limits)
        await runner.setup()
        server, loop = runner.server, asyncio.get_running_loop()
        assert server is not None
        try:
            # Our own protocol class (not TCPSite's default) so that answers to requests the HTTP
            # parser refused carry the security headers too.
            listener = await loop.create_server(
                lambda: _Handler(server, loop=loop, **limits), host or None, port, reuse_address=True
            )
        except OSError as exc:
            await runner.cleanup()
            why = "address already in use" if exc.errno == errno.EADDRINUSE else str(exc)
            raise ConfigError(
                f"monitor cannot listen on {host}:{port}: {why} (set monitor.http_port)"
            ) from None
        self._runner, self._listener = runner, listener
        self.port = listener.sockets[0].getsockname()[1] if listener.sockets else port  # the real one for 0

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._api is not None:
            await self._api.close()

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._token is not None and request.path not in self._open_paths and not self._authorised(request):
            raise web.HTTPUnauthorized(
                text="401: this monitor needs its token (Authorization: Bearer <token>)\n",
                headers=[("WWW-Authenticate", c) for c in CHALLENGES],  # type: ignore[arg-type]
            )
        return await handler(request)

    def _authorised(self, request: web.Request) -> bool:
        assert self._token is not None
        given = request.headers.get("Authorization", "")
        scheme, _, credentials = given.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            offered = credentials.strip().encode("utf-8", "replace")
        elif scheme == "basic":
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True)
            except (binascii.Error, ValueError):
                return False
            offered = decoded.partition(b":")[2]
        else:
            return False
        return hmac.compare_digest(offered, self._token)

    def _asset(self, body: str, content_type: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        data = body.encode()

        async def serve(request: web.Request) -> web.Response:
            return web.Response(body=data, content_type=content_type, charset="utf-8")

        return serve

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def status_body(self) -> bytes:
        """The JSON document, rebuilt when older than ``status_max_age``. Building it is synchronous
        (no ``await``), so concurrent requests can never build it twice."""
        now = self._clock()
        if self._status_body is None or now - self._status_at >= self._max_age:
            self._status_body = json.dumps(self._status(), separators=(",", ":")).encode()
            self._status_at = now
            self.status_computations += 1
        return self._status_body

    async def _api_status(self, request: web.Request) -> web.Response:
        return web.Response(body=self.status_body(), content_type="application/json")

    async def _dashboard(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _secure(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer, errors included: the security headers (``SECURITY_HEADERS``)."""
    response.headers.update(SECURITY_HEADERS)


_REFUSED_REQUESTS = ReasonThrottle()


class _Handler(RequestHandler):
    """aiohttp's connection handler, with the security headers on the answers it makes itself (a
    request its HTTP parser refused never reaches the application's signal) and one folded log
    line per kind of refused request instead of a traceback each (anyone can send garbage)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._manager is not None and len(self._manager.connections) > MAX_CONNECTIONS:
            admitted, folded = _REFUSED_REQUESTS.admit("too_many_connections")
            if admitted:
                log.warning(
                    "http_connection_refused", reason="too_many_connections", limit=MAX_CONNECTIONS,
                    similar_since_last_line=folded,
                )  # fmt: skip
            self.force_close()

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        response = super().handle_error(request, status, exc, message)
        response.headers.update(SECURITY_HEADERS)
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if not isinstance(exc, HttpProcessingError):
            super().log_exception(*args, **kw)  # a fault of ours: the whole traceback
            return
        admitted, folded = _REFUSED_REQUESTS.admit(type(exc).__name__)
        if admitted:
            log.warning(
                "http_request_refused", error=type(exc).__name__, status=exc.code,
                similar_since_last_line=folded,
            )  # fmt: skip
