"""The monitor's HTTP side: ``/metrics`` (Prometheus), ``/api/status`` (JSON), ``/`` (dashboard).

Read-only and cheap: every answer is computed from the in-memory state. ``/api/status`` is
computed at most once per ``STATUS_MAX_AGE`` and the same bytes served to every viewer meanwhile:
fifty dashboards open in a control room must not cost fifty times the work, nor slow the counting
(the monitor's one event loop does both). The page itself is a constant.
"""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from common.errors import ConfigError
from daemons.monitor.dashboard import PAGE

# Seconds one computed /api/status is served for. The dashboard polls every 2 s; the figures behind
# it (heartbeats, queue looks) change on the scale of seconds anyway.
STATUS_MAX_AGE = 1.0


class WebServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        status: Callable[[], dict[str, Any]],
        *,
        status_max_age: float = STATUS_MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._status = status
        self._max_age = status_max_age
        self._clock = clock
        self._status_body: bytes | None = None
        self._status_at = 0.0
        self.status_computations = 0  # how often the document was built (tests, and curiosity)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/status", self._api_status)
        app.router.add_get("/", self._dashboard)
        self._app = app

    async def start(self, host: str, port: int) -> None:
        """Listen, or raise ``ConfigError`` naming the setting to change when the port is taken."""
        runner = web.AppRunner(self._app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            why = "address already in use" if exc.errno == errno.EADDRINUSE else str(exc)
            raise ConfigError(
                f"monitor cannot listen on {host}:{port}: {why} (set monitor.http_port)"
            ) from None
        self._runner = runner
        self.port = runner.addresses[0][1] if runner.addresses else port  # the real one when port=0

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

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
        return web.Response(
            body=self.status_body(), content_type="application/json", headers={"Cache-Control": "no-store"}
        )

    async def _dashboard(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")
