"""Endpoint health in the replicator: may a copy to an endpoint start, and what follows a change.

Two things make an endpoint not writable: an operator (``spool rse set NAME --state readonly|down``)
and the endpoint's circuit breaker (``breaker``). Both are kept in the catalogue and polled every
``replication.poll_interval`` s (one read of every endpoint's row). Copies for a non-writable
endpoint are parked in the catalogue (replica state ``waiting``) and their message acked: the wait
costs no retry attempt and holds no message past the broker's consumer timeout, however long the
outage.

The breaker is shared by every replicator instance on the catalogue (``common.catalogue.transfers``
holds its state and makes each transition one conditional UPDATE; this instance keeps a copy of it
as last read). Transitions and their effects:
- the K-th consecutive failure here opens it -> catalogue health ``paused`` for all, and (by the
  instance that won the UPDATE) ``endpoint.paused``; the other instances see it at their next
  poll, or at their next failure there (they look then), and park their copies too
- cool-down over  -> one parked copy is re-sent as a nudge, by one instance (the first of the live
  replicators by id); whichever instance's copy then claims the probe (``claim_probe``) makes it,
  the others keep parking
- probe succeeds  -> ``endpoint.resumed``, health ``ok``, every parked copy re-sent (by the
  instance that resumed it: the parked copies of all instances are in the catalogue); a copy that
  another instance then decides to park from its view not yet read again is refused by the
  catalogue (``replication.park``: the endpoint is writable) and copied instead, never stranded
- probe fails     -> paused again for twice the cool-down (up to the maximum)
- the prober dies -> its claim is anyone's once its lease ran out (the probe is due again)
- operator sets the endpoint online again -> every parked copy re-sent (by each instance)

At start an instance re-sends every parked copy of a writable endpoint (which also recovers
copies parked by one that died). A pause found at start is kept when other replicator instances
are alive (it is theirs too); when none is, it was left by instances that all stopped, and is
ended with ``endpoint.resumed`` (the count starts again from zero), so every pause seen on the bus
ends.

The events are facts stated outside any message's ack: each is written to the catalogue's outbox
in the transaction that makes the transition, and published by the relay (``daemons.relay``) at
once; a broker outage delays them, never drops them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

from common.bus.publisher import Publisher
from common.catalogue import Catalogue, Wanted
from common.catalogue.sql import utcnow
from common.catalogue.transfers import EndpointView
from common.config import Settings
from common.errors import SpoolError
from common.instance import new_instance_id
from common.logging import get_logger
from common.messages import EndpointPaused, EndpointResumed
from common.placement import BULK, publish_wanted
from daemons.relay import OutboxRelay
from daemons.replicator.breaker import FailureCount, admission
from daemons.replicator.steps import PAUSE_AT_ONCE

log = get_logger("spool.replicator")

_RESEND_PAGE = 500
_CLOSED = EndpointView(state="online", health="ok")

# "go"; "probe": this copy is the endpoint's one probe; "wait": park it.
Admit = Literal["go", "probe", "wait"]


def _resumed(name: str) -> Callable[[float, int], EndpointResumed]:
    """``endpoint.resumed`` of ``name``, made in the transaction that resumes it (which knows how
    long it was paused and how many copies wait)."""

    def event(paused_seconds: float, waiting: int) -> EndpointResumed:
        return EndpointResumed(storage=name, paused_seconds=paused_seconds, waiting=waiting)

    return event


class EndpointHealth:
    def __init__(
        self,
        settings: Settings,
        catalogue: Catalogue,
        publisher: Publisher,
        *,
        instance: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        rep = settings.replication
        self.catalogue = catalogue
        self.publisher = publisher
        # This instance's lease id (the prober it names); a test without a lease gets an id no
        # live instance has.
        self.instance = instance or new_instance_id("replicator", settings.node)
        self.relay = OutboxRelay(catalogue, publisher, holder=self.instance)
        self.cooldown, self.max_cooldown = rep.breaker_cooldown, rep.breaker_max_cooldown
        self.counts = {
            name: FailureCount(rep.breaker_failures)
            for name, ep in settings.storage.items()
            if ep.kind == "disk"
        }
        self.views: dict[str, EndpointView] = {}  # the shared state per endpoint, as last read
        self.states: dict[str, str] = {}  # operator state per endpoint, as last read
        self.live: list[str] = []  # live replicator instances, as last read (while a pause lasts)
        self._clock = clock
        self._probe_sent: dict[str, float] = {}
        # Endpoints whose probe this instance claimed and has not reported yet. Kept apart from
        # ``views``: a poll's read that began before the claim committed can land after it and
        # show the endpoint merely paused; the probe's outcome must still be reported, or the
        # catalogue shows it probed by a live instance for ever and nobody probes again.
        self._probes: set[str] = set()
        self._resending: dict[str, asyncio.Task[None]] = {}

    def view(self, name: str) -> EndpointView:
        return self.views.get(name, _CLOSED)

    # --- asked by the handler ------------------------------------------------------------------
    async def admit(self, name: str) -> Admit:
        """``go``, ``probe`` (this copy is the endpoint's one probe: report its outcome, or
        ``release_probe``) or ``wait`` (park it). No catalogue round trip unless a probe may be due."""
        if self.states.get(name, "online") != "online":
            return "wait"
        decided = admission(self.view(name), self.instance, self.live, utcnow())
        if decided != "try_probe":
            return decided
        if await self.catalogue.transfers.claim_probe(name, self.instance, utcnow()):
            self._probes.add(name)
            self._set(name, health="probing", prober=self.instance)
            log.info("endpoint_probing", storage=name)
            return "probe"
        await self._read()  # another instance probes, or the endpoint resumed meanwhile
        return "go" if self.writable(name) else "wait"

    async def refresh(self) -> None:
        """Read the shared state again now (the catalogue refused to park a copy: the endpoint is
        writable by now)."""
        await self._read()

    def writable(self, name: str) -> bool:
        return self.states.get(name, "online") == "online" and self.view(name).health == "ok"

    def probing_here(self, name: str) -> bool:
        """Whether this instance claimed the endpoint's probe and has not reported it yet (the
        catalogue's conditional UPDATEs decide whether the report still counts)."""
        return name in self._probes

    async def failure(self, name: str, err: SpoolError) -> bool:
        """Count a failure of endpoint ``name``; True when it is now paused (park the copy)."""
        why = f"{err.reason}: {err.message}"
        if self.probing_here(name):
            self._probes.discard(name)
            cooldown = await self.catalogue.transfers.probe_failed(
                name, self.instance, why, self.cooldown, self.max_cooldown, utcnow()
            )
            if cooldown is not None:
                log.info("endpoint_probe_failed", storage=name, reason=err.reason, cooldown=cooldown)
            await self._read()
            return True
        at_once = err.reason in PAUSE_AT_ONCE
        if self.counts[name].record_failure(at_once=at_once):
            failures = 1 if at_once else self.counts[name].failures_to_open
            event = EndpointPaused(
                storage=name, reason=err.reason, error=err.message, failures=failures, cooldown=self.cooldown
            )
            if await self.catalogue.transfers.pause(name, why, self.cooldown, utcnow(), event):
                log.warning(
                    "endpoint_paused", storage=name, reason=err.reason, error=err.message,
                    failures=failures, cooldown=self.cooldown,
                )  # fmt: skip
                await self.relay.send_now()
        # Whoever paused it (this failure, or another instance before): from now on, park.
        await self._read()
        return self.view(name).health != "ok"

    async def success(self, name: str) -> None:
        self.counts[name].record_success()
        self._probes.discard(name)
        if self.view(name).health == "ok":
            return  # the common case: no I/O
        # A copy landed (the probe, or one admitted before the pause): the endpoint works.
        paused_for = (utcnow() - since).total_seconds() if (since := self.view(name).since) else 0.0
        resumed = await self.catalogue.transfers.resume(name, utcnow(), _resumed(name))
        self._set(name, health="ok", prober=None, until=None, cooldown=None)
        if resumed:
            log.info("endpoint_resumed", storage=name, paused_seconds=round(paused_for, 1))
            await self.relay.send_now()
            self.resend(name)

    async def release_probe(self, name: str) -> None:
        """The probe ended without telling anything about the endpoint (e.g. its source was bad):
        let the next copy (of any instance) be the probe."""
        if self.probing_here(name):
            self._probes.discard(name)
            await self.catalogue.transfers.release_probe(name, self.instance)
            self._set(name, health="paused", prober=None)

    # --- the poll loop -------------------------------------------------------------------------
    async def start(self) -> None:
        """First look: events a predecessor left unsent published, the shared state read, a pause
        nobody alive holds ended, parked copies re-sent."""
        await self.relay.start()
        await self._read()
        others = [i for i in await self._live() if i != self.instance]
        for name in self.counts:
            view = self.view(name)
            if view.health != "ok" and not others:
                # Paused by instances that all stopped: none is left to probe it; start closed.
                resumed = await self.catalogue.transfers.resume(name, utcnow(), _resumed(name))
                if resumed:
                    log.info("endpoint_resumed", storage=name, why="breaker_reset_at_start")
                    self.relay.kick()
                self._set(name, health="ok", prober=None, until=None, cooldown=None)
            elif view.health != "ok":
                log.info("endpoint_paused_by_another_instance", storage=name, health=view.health)
            if self.writable(name):
                self.resend(name)

    async def poll(self) -> None:
        before = dict(self.states)
        await self._read()
        if any(v.health != "ok" for v in self.views.values()) or before != self.states:
            await self._live()
        now = utcnow()
        for name in self.counts:
            view = self.view(name)
            if before.get(name, "online") != "online" and self.writable(name):
                # The operator set it online again: its parked copies re-sent, by one instance.
                # (A pause ending is re-sent by the instance that ended it, in ``success``.)
                if self._leads():
                    log.info("endpoint_writable_again", storage=name, state=self.states.get(name))
                    self.resend(name)
            elif self.states.get(name, "online") == "online" and (
                admission(view, self.instance, self.live, now) == "try_probe"
            ):
                await self._send_probe(name, view)

    def _leads(self) -> bool:
        """Whether this instance does what one instance does for all (the first live one by id;
        an instance without a lease, or whose lease the last read did not see, counts as alone)."""
        return self.instance not in self.live or self.live[0] == self.instance

    async def _read(self) -> None:
        self.views = await self.catalogue.transfers.views()
        self.states = {name: v.state for name, v in self.views.items()}

    async def _live(self) -> list[str]:
        self.live = await self.catalogue.instances.live_ids("replicator", utcnow())
        return self.live

    def _set(self, name: str, **changes: object) -> None:
        self.views[name] = dataclasses.replace(self.view(name), **changes)  # type: ignore[arg-type]

    async def _send_probe(self, name: str, view: EndpointView) -> None:
        """Probe due: re-send one parked copy; whichever copy arrives first (at any instance) and
        claims the probe makes it. Sent by one instance, the first live one by id (by each alone,
        when this one has no lease), at most once per cool-down."""
        if not self._leads():
            return
        sent = self._probe_sent.get(name)
        if sent is not None and self._clock() - sent < (view.cooldown or self.cooldown):
            return
        rows = await self.catalogue.replication.waiting(name, 1, parked_before=datetime.now(UTC))
        if rows:
            prio, _, file_name = rows[0]
            self._probe_sent[name] = self._clock()
            log.info("endpoint_probe", storage=name, file=file_name)
            await publish_wanted(self.publisher, [Wanted(file_name, name, "disk", prio, "")])

    def resend(self, name: str) -> None:
        """Re-send every copy parked on ``name`` (in the background, one task per endpoint)."""
        task = self._resending.get(name)
        if task is not None and not task.done():
            task.cancel()  # start over from the top: it re-sends only what is still parked
        self._resending[name] = asyncio.create_task(self._resend(name), name=f"resend-{name}")

    async def _resend(self, name: str) -> None:
        cutoff = datetime.now(UTC)
        after: tuple[int, int] | None = None
        sent = 0
        try:
            while True:
                rows = await self.catalogue.replication.waiting(
                    name, _RESEND_PAGE, parked_before=cutoff, after=after
                )
                if not rows:
                    break
                wanted = [Wanted(n, name, "disk", prio, "") for prio, _, n in rows]
                await publish_wanted(self.publisher, wanted, bulk=BULK)
                sent += len(rows)
                after = (rows[-1][0], rows[-1][1])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the next resume or restart re-sends; never kill the daemon
            log.error("resend_failed", storage=name, error=str(exc), sent=sent)
            return
        if sent:
            log.info("parked_copies_resent", storage=name, count=sent)

    async def close(self) -> None:
        for task in self._resending.values():
            task.cancel()
        await asyncio.gather(*self._resending.values(), return_exceptions=True)
        await self.relay.close()
