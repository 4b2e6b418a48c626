"""The monitor's HTTP side: ``/metrics`` (Prometheus), ``/api/status`` (JSON), ``/`` (dashboard).

Read-only and cheap: every answer is computed from the in-memory state at request time.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from common.errors import ConfigError
from daemons.monitor.dashboard import PAGE


class WebServer:
    def __init__(self, registry: CollectorRegistry, status: Callable[[], dict[str, Any]]) -> None:
        self._registry = registry
        self._status = status
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

    async def _api_status(self, request: web.Request) -> web.Response:
        return web.json_response(self._status())

    async def _dashboard(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")
