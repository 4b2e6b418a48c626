"""The monitor's I/O glue: it observes every message on the bus and serves what it saw.

Its queue ``<prefix>.monitor`` is bound to ``#`` (newest million kept, ``drop-head``). One handler
takes every known message type (``Service.any_message``); what it cannot read is counted and acked
(``Service.malformed_hook``) instead of dead-lettered, since a monitor that parked every message it
does not understand would fill a queue nobody reads. In production the deliveries are taken by the
monitor's own runner (``consumer.MonitorRunner``: batched acks, no per-message context), which
calls the same ``MonitorResources.observe`` as the handler. Alerts are published by a task of
their own after the state is updated; one that cannot be published waits for the next message or
poll, so a broker hiccup neither loses it nor holds up (or repeats) the counting.

Two monitors may run on one catalogue, one active and one standby (``role``): the active one
consumes and saves its state every ``monitor.save_interval`` (``snapshot``); the one that takes
over restores it; a standby serves the last saved state. With SQLite the same works for monitors
on one host.

Every fact passes the monitor's door first (``intake``): Spool's facts count only when the
delivery's AMQP ``user_id`` is one of Spool's users, and malformed ones are refused, counted and
logged (one line per reason per minute, with how many were folded into it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import structlog

from common.bus.publisher import Publisher
from common.bus.service import Context, Service
from common.bus.trust import is_spool_user
from common.config import Settings
from common.errors import ConfigError, SpoolError
from common.log_folding import ReasonThrottle
from common.messages import AlertRaised, Message
from common.periodic import every
from daemons.monitor.api import QueryApi
from daemons.monitor.consumer import MonitorRunner
from daemons.monitor.intake import MonitorLabels, Refused
from daemons.monitor.metrics import build_registry
from daemons.monitor.poller import Poller
from daemons.monitor.report import Observed, status_document
from daemons.monitor.role import RoleKeeper
from daemons.monitor.snapshot import UnreadableSnapshot, dump, restore
from daemons.monitor.stalls import Stalls
from daemons.monitor.steps import MonitorState, Thresholds
from daemons.monitor.web import WebServer, is_loopback

log = structlog.get_logger("spool.monitor")


@dataclass
class MonitorResources:
    state: MonitorState
    observed: Observed
    publisher: Publisher
    web: WebServer
    poller: Poller
    role: RoleKeeper
    trusted: Callable[[str | None], bool] = field(default=lambda _user: True, repr=False)
    pending_alerts: list[AlertRaised] = field(default_factory=list)
    flushing: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    runner: MonitorRunner | None = field(default=None, init=False, repr=False)  # set by its start
    _saved_pending: int = field(default=0, init=False, repr=False)

    def observe(self, msg: Message, user_id: str | None) -> None:
        """Account for one message (``user_id``: the delivery's AMQP user_id) and start publishing
        the alerts it raised. Synchronous: the monitor's runner relies on observing deliveries in
        order, without waiting in between."""
        alerts = self.state.observe(msg, trusted=self.trusted(user_id))
        if alerts:
            self.pending_alerts.extend(alerts)
            self.start_flush()

    def start_flush(self) -> None:
        """Only the active monitor publishes alerts (a standby's are the active one's, saved)."""
        if not self.role.active:
            return
        if self.pending_alerts and (self.flushing is None or self.flushing.done()):
            self.flushing = asyncio.get_running_loop().create_task(self.flush_alerts())

    async def flush_alerts(self) -> None:
        """Publish waiting alerts in order; stop at the first failure and keep the rest."""
        while self.pending_alerts:
            alert = self.pending_alerts.pop(0)  # taken first: concurrent flushes never send it twice
            try:
                await self.publisher.publish(alert)
            except SpoolError as exc:
                self.pending_alerts.insert(0, alert)
                log.warning("alert_not_published_yet", summary=alert.summary, error=exc.message)
                return
            log.warning("alert_raised", kind=alert.kind, summary=alert.summary)

    async def poll(self) -> None:
        """One look, every ``monitor.poll_interval``: a throughput sample (standby: the saved state
        again), the queues and the endpoints, and another try at the alerts not published yet."""
        if self.role.active:
            self.state.sample()
        else:
            await self.show_saved()
        await self.poller.once()
        if self.role.active:
            found = await self.poller.stalled_work(self.state.stalls.limits)
            if found is not None:
                self.pending_alerts.extend(self.state.observe_stalled(found))
        self.start_flush()

    # --- active / standby (``role``) ------------------------------------------------------------
    async def restore_saved(self) -> None:
        """Taking the role over: start from the saved state (raises when it cannot be read, so
        the role is given back; a damaged document is logged and counting starts from zero)."""
        saved = await self.role.load()
        doc = dump(MonitorState(self.state.thresholds)) if saved is None else saved.doc
        try:
            pending = restore(self.state, doc)
        except UnreadableSnapshot as exc:
            log.error("monitor_state_unreadable", error=str(exc), saved_by=self.role.saved_by)
            pending = restore(self.state, dump(MonitorState(self.state.thresholds)))
        self.pending_alerts[:] = pending
        self._saved_pending = len(pending)
        log.info(
            "monitor_state_restored", messages=self.state.messages, failure_groups=len(self.state.failures),
            alerts_to_publish=len(pending), saved_by=self.role.saved_by, saved_at=self.role.saved_at,
        )  # fmt: skip

    async def consume(self) -> None:
        if self.runner is not None:
            await self.runner.resume()
        self.start_flush()

    async def stand_by(self, why: str) -> None:
        """The role was lost: stop consuming; the alerts not published are the successor's (it
        restores them from the save, or raises them again when it counts the given-back facts)."""
        self.pending_alerts.clear()
        if self.runner is not None:
            await self.runner.pause()

    async def show_saved(self) -> None:
        """Standby: the active monitor's last saved state, for the page and ``spool status``."""
        try:
            saved = await self.role.load()
        except Exception as exc:  # the catalogue unreachable: the last one shown stays
            log.warning("monitor_state_not_read", error=repr(exc))
            return
        if saved is None or self.role.active:
            return
        try:
            restore(self.state, saved.doc)
        except UnreadableSnapshot as exc:
            log.warning("monitor_state_unreadable", error=str(exc), saved_by=saved.saved_by)

    def state_changed(self) -> bool:
        """Whether a save is due with nothing counted: alerts published (or raised) since the last."""
        return len(self.pending_alerts) != self._saved_pending

    def saved(self, doc: dict[str, Any]) -> None:
        self._saved_pending = len(doc["pending_alerts"])


def make_state(settings: Settings) -> MonitorState:
    m = settings.monitor
    state = MonitorState(
        Thresholds(settings.bus.heartbeat_interval, m.heartbeat_late, m.heartbeat_dead, m.forget_after),
        labels=MonitorLabels.create(storages=settings.storage),
        stalls=Stalls({str(k): v for k, v in m.stall_limits.items()}),
    )
    state.on_refused = _refusal_logger()
    return state


def _refusal_logger() -> Callable[[str, Refused], None]:
    """One ``fact_refused`` line per reason per minute, with the count of those folded into it."""
    throttle = ReasonThrottle()

    def log_refusal(routing_key: str, refused: Refused) -> None:
        admitted, folded = throttle.admit(refused.reason)
        if admitted:
            log.warning(
                "fact_refused", reason=refused.reason, error=refused.detail[:500], routing_key=routing_key,
                similar_since_last_line=folded,
            )  # fmt: skip

    return log_refusal


def trust_of(settings: Settings) -> Callable[[str | None], bool]:
    """``common.bus.trust.is_spool_user`` for this configuration, remembered per user_id (the
    monitor asks for every message; the broker has few users)."""
    known: dict[str | None, bool] = {}

    def trusted(user_id: str | None) -> bool:
        answer = known.get(user_id)
        if answer is None:
            answer = is_spool_user(user_id, settings.bus)
            if len(known) < 256:
                known[user_id] = answer
        return answer

    return trusted


def make_web(
    settings: Settings, state: MonitorState, observed: Observed, role: RoleKeeper | None = None
) -> WebServer:
    """The HTTP side, or ``ConfigError`` (one line) when it would listen beyond this host unprotected."""
    m = settings.monitor
    token = m.token()
    if token is None and not is_loopback(m.http_host):
        raise ConfigError(
            f"monitor.http_host = {m.http_host!r} listens beyond this host: set monitor.token_file "
            "(or SPOOL_MONITOR_TOKEN) so /api/status and the dashboard need a token, or listen on 127.0.0.1"
        )
    return WebServer(
        build_registry(state, observed, role), lambda: status_document(state, observed, role=role),
        token=token, metrics_public=m.metrics_public, request_timeout=m.http_request_timeout,
        api=QueryApi(settings.catalogue.url),
    )  # fmt: skip


@asynccontextmanager
async def open_monitor_resources(settings: Settings, publisher: Publisher) -> AsyncIterator[MonitorResources]:
    state = make_state(settings)
    observed = Observed()
    holder: list[MonitorResources] = []  # the role's callbacks reach the resources made below
    role = RoleKeeper(
        settings,
        restore=lambda: holder[0].restore_saved(),
        on_active=lambda: holder[0].consume(),
        on_standby=lambda why: holder[0].stand_by(why),
    )
    web = make_web(settings, state, observed, role)
    await web.start(settings.monitor.http_host, settings.monitor.http_port)
    log.info("monitor_listening", host=settings.monitor.http_host, port=web.port, token=web.protected)
    res = MonitorResources(
        state, observed, publisher, web, Poller(settings, state, observed), role, trusted=trust_of(settings)
    )
    holder.append(res)
    task: asyncio.Task[None] | None = None
    try:
        # The first claim before the runner starts, so that a lone monitor consumes from the start.
        await role.step()
        role.start()
        polls = every(settings.monitor.poll_interval, res.poll, name="monitor-poll", log=log)
        task = asyncio.create_task(polls)
        yield res
    finally:
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        if res.flushing is not None:
            with suppress(asyncio.CancelledError):
                await res.flushing
        await role.close()  # after the runner's last save (it drained first): the role given up
        await web.stop()
        await res.poller.close()


service = Service("monitor", resources=open_monitor_resources, runner=MonitorRunner)


@service.any_message
async def observe(msg: Message, ctx: Context[MonitorResources]) -> None:
    ctx.resources.observe(msg, ctx.user_id)


@service.malformed_hook
async def count_malformed(routing_key: str, err: SpoolError, ctx: Context[Any]) -> None:
    ctx.resources.state.observe_malformed(routing_key, err.reason, err.message)
