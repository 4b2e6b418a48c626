"""Endpoint health in the replicator: may a copy to an endpoint start, and what follows a change.

Two things make an endpoint not writable: an operator (``spool rse set NAME --state readonly|down``,
kept in the catalogue and polled every ``replication.poll_interval`` s) and this process's circuit
breaker (``breaker``). Copies for a non-writable endpoint are parked in the catalogue (replica
state ``waiting``) and their message acked: the wait costs no retry attempt and holds no message
past the broker's consumer timeout, however long the outage.

Transitions and their effects:
- breaker opens   -> ``endpoint.paused`` event, catalogue health ``paused`` (``spool rse list``)
- cool-down over  -> one parked copy is re-sent as the probe (or the next request becomes it)
- probe succeeds  -> ``endpoint.resumed`` event, health ``ok``, every parked copy re-sent
- operator sets the endpoint online again -> every parked copy re-sent

Breakers live in each replicator process (a site running several shares the catalogue's health
column for display only); at start every parked copy of a writable endpoint is re-sent, which also
recovers copies parked by a process that died, and an endpoint a dead process left ``paused`` is
announced ``endpoint.resumed`` (the new breaker starts closed), so every pause seen on the bus ends.

The events are facts of this process's breaker stated outside any message's ack: each is written
to the catalogue's outbox with the health it reports, in one transaction, and published by the
relay (``daemons.relay``) at once; a broker outage delays them, never drops them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

from common.bus.publisher import Publisher
from common.catalogue import Catalogue, Wanted
from common.config import Settings
from common.errors import SpoolError
from common.logging import get_logger
from common.messages import EndpointPaused, EndpointResumed
from common.placement import BULK, publish_wanted
from daemons.relay import OutboxRelay
from daemons.replicator.breaker import Admission, CircuitBreaker
from daemons.replicator.steps import PAUSE_AT_ONCE

log = get_logger("spool.replicator")

_RESEND_PAGE = 500


class EndpointHealth:
    def __init__(
        self,
        settings: Settings,
        catalogue: Catalogue,
        publisher: Publisher,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        rep = settings.replication
        self.catalogue = catalogue
        self.publisher = publisher
        self.relay = OutboxRelay(catalogue, publisher)
        self.breakers = {
            name: CircuitBreaker(rep.breaker_failures, rep.breaker_cooldown, rep.breaker_max_cooldown, clock)
            for name, ep in settings.storage.items()
            if ep.kind == "disk"
        }
        self.states: dict[str, str] = {}  # operator state per endpoint, as last polled
        self._clock = clock
        self._probe_sent: dict[str, float] = {}
        self._resending: dict[str, asyncio.Task[None]] = {}

    # --- asked by the handler ------------------------------------------------------------------
    def admit(self, name: str) -> Admission:
        if self.states.get(name, "online") != "online":
            return "wait"
        return self.breakers[name].admit()

    def writable(self, name: str) -> bool:
        return self.states.get(name, "online") == "online" and self.breakers[name].state == "closed"

    async def failure(self, name: str, err: SpoolError) -> bool:
        """Count a failure of endpoint ``name``; True when it is now paused (park the copy)."""
        breaker = self.breakers[name]
        at_once = err.reason in PAUSE_AT_ONCE
        if breaker.record_failure(err.reason, err.message, at_once=at_once):
            failures = 1 if at_once else breaker.failures_to_open
            log.warning(
                "endpoint_paused", storage=name, reason=err.reason, error=err.message,
                failures=failures, cooldown=breaker.current_cooldown,
            )  # fmt: skip
            event = EndpointPaused(
                storage=name,
                reason=err.reason,
                error=err.message,
                failures=failures,
                cooldown=breaker.current_cooldown,
            )
            why = f"{err.reason}: {err.message}"
            await self.catalogue.endpoints.health_changed(name, "paused", why, event)
            await self.relay.send_now()
        elif breaker.state == "open":
            log.info(
                "endpoint_probe_failed", storage=name, reason=err.reason, cooldown=breaker.current_cooldown
            )
        return breaker.state != "closed"

    async def success(self, name: str) -> None:
        breaker = self.breakers[name]
        paused_for = breaker.paused_for()
        if breaker.record_success():
            waiting = await self.catalogue.replication.waiting_count(name)
            log.info("endpoint_resumed", storage=name, paused_seconds=round(paused_for, 1), waiting=waiting)
            event = EndpointResumed(storage=name, paused_seconds=paused_for, waiting=waiting)
            await self.catalogue.endpoints.health_changed(name, "ok", None, event)
            await self.relay.send_now()
            self.resend(name)

    def release_probe(self, name: str) -> None:
        self.breakers[name].release_probe()

    # --- the poll loop -------------------------------------------------------------------------
    async def start(self) -> None:
        """First look: events a predecessor left unsent published, operator states, fresh (closed)
        breakers (a pause left by a predecessor ends with ``endpoint.resumed``), parked copies
        re-sent."""
        await self.relay.start()
        await self._read_states()
        left = {e.name: e for e in await self.catalogue.endpoints.all()}
        for name in self.breakers:
            ep = left.get(name)
            if ep is not None and ep.health == "paused":
                since = ep.health_since or datetime.now(UTC)
                event = EndpointResumed(
                    storage=name,
                    paused_seconds=max(0.0, (datetime.now(UTC) - since).total_seconds()),
                    waiting=await self.catalogue.replication.waiting_count(name),
                )
                log.info("endpoint_resumed", storage=name, why="breaker_reset_at_start")
                await self.catalogue.endpoints.health_changed(name, "ok", None, event)
                self.relay.kick()
            else:
                await self.catalogue.endpoints.set_health(name, "ok", None)
            if self.writable(name):
                self.resend(name)

    async def poll(self) -> None:
        before = dict(self.states)
        await self._read_states()
        for name, breaker in self.breakers.items():
            if before.get(name, "online") != "online" and self.writable(name):
                log.info("endpoint_writable_again", storage=name, state=self.states.get(name))
                self.resend(name)
            elif breaker.state == "open" and breaker.cooldown_elapsed():
                await self._send_probe(name)

    async def _read_states(self) -> None:
        self.states = await self.catalogue.endpoints.states()

    async def _send_probe(self, name: str) -> None:
        """Cool-down over: re-send one parked copy; whichever copy arrives first is the probe."""
        sent = self._probe_sent.get(name)
        breaker = self.breakers[name]
        if sent is not None and self._clock() - sent < breaker.current_cooldown:
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
