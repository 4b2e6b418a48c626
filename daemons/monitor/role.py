"""Active or standby: which of the monitors sharing a catalogue consumes the monitor's queue.

Decision (issue 19): **active / standby through a role lease**, not one queue per monitor. Two
monitors each with its own queue would each count everything (two sets of figures, two alerts per
new cause) and would need their counts merged; one shared queue consumed by both would split the
counts between them. So one monitor at a time is *active*: it holds the ``monitor`` role
(``role_leases``, ``common.catalogue.instances.claim_role``) under its instance lease's id
(``common.instance.InstanceLease``), renews it every third of ``catalogue.lease_seconds``, and
only it consumes ``<prefix>.monitor``. The others are *standby*: they try to claim the role at
the same pace and take over when the active one's lease ran out (killed, host gone, catalogue
unreachable from it) or was released (clean stop). The queue is durable: what is published while
no monitor consumes waits there (the newest million, as always).

Coordination is PostgreSQL's own (or SQLite's, for monitors on one host): a row with an expiry,
claimed by a conditional UPDATE; no protocol between the monitors. Takeover comes at most a lease
and a third of it after the active one died (30 s + 10 s by default), within a third of the lease
after a clean stop.

What the active one counted survives it: it saves its state in the catalogue every
``monitor.save_interval`` seconds (``daemons.monitor.snapshot``; ``monitor_state``, written only
while it holds the role, see ``common.catalogue.monitor_state``), and a monitor becoming active
starts from the saved state. Deliveries are acked only once a save holding them is committed
(``daemons.monitor.consumer``), so nothing acked is missing from the saved state.

A role not renewed in time is lost: the monitor stops consuming at once, gives the deliveries it
counted but did not save back to the queue, and becomes standby (it does not end its process, so
its web page keeps answering). A catalogue unreachable at start leaves it standby until it can
claim. A standby serves the last saved state (reloaded every ``monitor.poll_interval``), saying
it is standby and which instance is active; its ``/metrics`` carries ``spool_monitor_active 0``
only, so Prometheus scraping both monitors sums nothing twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import structlog

from common.catalogue import Catalogue
from common.catalogue.monitor_state import SavedState
from common.catalogue.repositories.monitor_state import MonitorStateRepository
from common.catalogue.sql import utcnow
from common.config import Settings
from common.instance import InstanceLease
from common.periodic import every

log = structlog.get_logger("spool.monitor")

ROLE = "monitor"
STATE_NAME = "monitor"


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else repr(exc)


class RoleKeeper:
    """This monitor's claim on the role. When the role is taken, ``restore`` is awaited (the saved
    state into memory; an exception gives the role back), then ``on_active`` (consume); when it is
    lost, ``on_standby(why)`` (stop consuming)."""

    def __init__(
        self,
        settings: Settings,
        *,
        restore: Callable[[], Awaitable[None]],
        on_active: Callable[[], Awaitable[None]],
        on_standby: Callable[[str], Awaitable[None]],
    ) -> None:
        self.url = settings.catalogue.url
        self.node = settings.node
        self.lease_seconds = settings.catalogue.lease_seconds
        self.active = False
        self.expires: datetime | None = None  # the role's expiry (this process's clock), if active
        self.holder: str | None = None  # the active instance, as last read
        self.error: str | None = "not looked at yet"
        self.saved_at: datetime | None = None
        self.saved_by: str | None = None
        self.catalogue: Catalogue | None = None
        self.lease: InstanceLease | None = None
        self._restore = restore
        self._on_active = on_active
        self._on_standby = on_standby
        self._lock = asyncio.Lock()  # claims, take-overs and losses one at a time
        self._task: asyncio.Task[None] | None = None

    @property
    def instance(self) -> str | None:
        return None if self.lease is None else self.lease.id

    def start(self) -> None:
        """Claim (or renew) every third of the lease, from now on."""
        self._task = asyncio.create_task(
            every(self.lease_seconds / 3, self.step, name="monitor-role", log=log)
        )

    def valid(self) -> bool:
        """Active, and the role's lease not run out by this process's clock."""
        return self.active and self.expires is not None and utcnow() < self.expires

    # --- one round ------------------------------------------------------------------------------
    async def step(self) -> None:
        async with self._lock:
            try:
                lease = await self._lease()
                now = utcnow()
                assert self.catalogue is not None
                mine = await self.catalogue.instances.claim_role(
                    ROLE, lease.id, now, now + timedelta(seconds=self.lease_seconds)
                )
                holder = lease.id if mine else await self.catalogue.instances.role_holder(ROLE, utcnow())
                self.error = None
            except Exception as exc:  # catalogue unreachable: keep the role only until it runs out
                self.error = f"catalogue unavailable: {_one_line(exc)}"
                log.warning("monitor_role_not_renewed", error=self.error, active=self.active)
                if self.active and not self.valid():
                    await self._lose("the role's lease ran out before it could be renewed")
                return
            self.holder = holder
            if not mine:
                if self.active:
                    await self._lose(f"another monitor holds the role: {holder}")
                return
            self.expires = now + timedelta(seconds=self.lease_seconds)
            if not self.active:
                await self._take(lease)

    async def _lease(self) -> InstanceLease:
        if self.catalogue is None:
            self.catalogue = await Catalogue.open(self.url)
        if self.lease is None or self.lease.lost:
            # A lost lease (not renewed in time) is never renewed: this process goes on as a new
            # instance instead of stopping (``InstanceLease``'s default), so its page keeps answering.
            if self.active:
                await self._lose("the instance lease was lost")
            lease = InstanceLease(self.catalogue, "monitor", self.node, self.lease_seconds, on_lost=_nothing)
            await lease.start()
            self.lease = lease
        return self.lease

    async def _take(self, lease: InstanceLease) -> None:
        try:
            await self._restore()
        except Exception as exc:  # the saved state could not be read: let another try
            log.error("monitor_take_over_failed", error=_one_line(exc), instance=lease.id)
            await self._release(lease)
            return
        self.active = True  # before consuming: a delivery reaching a monitor not active is given back
        log.warning("monitor_active", instance=lease.id, saved_by=self.saved_by, saved_at=self.saved_at)
        await self._on_active()

    async def lose(self, why: str) -> None:
        """Stop being active (the role was lost): called by the saver too."""
        async with self._lock:
            if self.active:
                await self._lose(why)

    async def _lose(self, why: str) -> None:
        self.active = False
        self.expires = None
        if self.holder == self.instance:
            self.holder = None  # not known until the next round reads it
        log.error("monitor_role_lost", instance=self.instance, why=why)
        await self._on_standby(why)

    async def _release(self, lease: InstanceLease) -> None:
        assert self.catalogue is not None
        try:
            await self.catalogue.instances.release_role(ROLE, lease.id)
        except Exception as exc:  # it runs out by itself
            log.warning("monitor_role_not_released", error=_one_line(exc))

    # --- the saved state ------------------------------------------------------------------------
    async def save(self, doc: dict[str, Any]) -> bool:
        """Save ``doc`` while holding the role; False when the role is not ours (any more): the
        caller then calls ``lose``, once it holds no lock the loss needs (the runner's save lock)."""
        if not self.valid():
            return False
        assert self.catalogue is not None and self.lease is not None
        now = utcnow()
        saved = await MonitorStateRepository(self.catalogue).save(STATE_NAME, ROLE, self.lease.id, doc, now)
        if saved:
            self.saved_at, self.saved_by = now, self.lease.id
        return saved

    async def load(self) -> SavedState | None:
        """The last saved state (``None``: never saved). Raises when the catalogue cannot be read."""
        if self.catalogue is None:
            self.catalogue = await Catalogue.open(self.url)
        saved = await MonitorStateRepository(self.catalogue).load(STATE_NAME)
        if saved is not None:
            self.saved_at, self.saved_by = saved.saved_at, saved.saved_by
        return saved

    def describe(self) -> dict[str, Any]:
        """For ``/api/status``: this monitor's role and whose figures it shows."""
        return {
            "role": "active" if self.active else "standby",
            "instance": self.instance,
            "active_instance": self.holder,
            "state_saved_at": self.saved_at,
            "state_saved_by": self.saved_by,
            "catalogue_error": self.error,
        }

    async def close(self) -> None:
        """A clean stop (after the runner's last save): give the role up at once, end the lease."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        lease, self.lease = self.lease, None
        if lease is not None:
            if self.active:
                self.active = False
                await self._release(lease)
            await lease.stop()
        catalogue, self.catalogue = self.catalogue, None
        if catalogue is not None:
            await catalogue.close()


def _nothing() -> None:
    """A lost instance lease is noticed by the next round (``RoleKeeper._lease``)."""
