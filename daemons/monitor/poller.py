"""The monitor's periodic look at what the bus cannot tell it: queue depths (broker) and endpoint
states (catalogue). Each source may be down; the last error is kept and shown, never raised."""

from __future__ import annotations

import socket

import structlog
from aio_pika.abc import AbstractRobustConnection

from common.bus.connection import connect
from common.bus.management import ManagementClient, endpoint_for
from common.bus.queue_stats import queue_report
from common.catalogue import Catalogue
from common.catalogue.sql import utcnow
from common.config import Settings
from common.errors import SpoolError
from daemons.monitor.report import Observed
from daemons.monitor.stalls import Stall, daemon_of
from daemons.monitor.steps import MonitorState

log = structlog.get_logger("spool.monitor")


class Poller:
    def __init__(self, settings: Settings, state: MonitorState, observed: Observed) -> None:
        self.settings = settings
        self.state = state
        self.observed = observed
        self._connection: AbstractRobustConnection | None = None
        self._catalogue: Catalogue | None = None
        self._management: ManagementClient | None = None

    async def once(self) -> None:
        for forgotten in self.state.prune():
            log.info("instance_forgotten", instance=forgotten)
        await self._look_at_queues()
        await self._look_at_endpoints()

    async def _look_at_queues(self) -> None:
        amqp_error = None
        if self._connection is None:
            try:
                # Its own connection: passive declares of a missing queue close their channel, which
                # must not disturb the consuming channel.
                self._connection = await connect(
                    self.settings.bus, name=f"spool-monitor-stats@{socket.gethostname()}"
                )
            except SpoolError as exc:
                amqp_error = exc.message
        if self._management is None:
            m = self.settings.monitor
            try:
                endpoint = endpoint_for(self.settings.bus, m.management_url)
                self._management = ManagementClient(endpoint, timeout=m.management_timeout)
            except ValueError:
                pass  # queue_report names the bad setting
        try:
            self.observed.queues = await queue_report(
                self.settings, connection=self._connection, management=self._management, amqp_error=amqp_error
            )
        except Exception as exc:  # a look that failed must not stop the next one
            log.error("queue_look_failed", error=repr(exc))

    async def _look_at_endpoints(self) -> None:
        try:
            if self._catalogue is None:
                self._catalogue = await Catalogue.open(self.settings.catalogue.url)
            self.observed.endpoints = await self._catalogue.endpoints.all()
            self.observed.catalogue_error = None
        except Exception as exc:  # SQLAlchemy / driver errors: shown in status, tried again next time
            text = str(exc).splitlines()[0] if str(exc) else repr(exc)
            self.observed.catalogue_error = f"catalogue unavailable: {text}"

    async def stalled_work(self, limits: dict[str, float]) -> list[Stall] | None:
        """Tape writes, tape reads and recalls in progress past their limit (None: the catalogue
        could not be read; the stalls known stay as they were)."""
        wanted = {k: v for k, v in limits.items() if k != "delivery"}
        if not wanted or self._catalogue is None:
            return [] if not wanted else None
        try:
            found = await self._catalogue.instances.stalled_work(wanted, utcnow())
        except Exception as exc:
            log.warning("stalled_work_look_failed", error=repr(exc))
            return None
        return [Stall(w.kind, w.holder or "nobody", daemon_of(w.holder or ""), w.example, w.since, w.items)
                for w in found]  # fmt: skip

    async def close(self) -> None:
        if self._management is not None:
            await self._management.close()
        if self._connection is not None:
            await self._connection.close()
        if self._catalogue is not None:
            await self._catalogue.close()
